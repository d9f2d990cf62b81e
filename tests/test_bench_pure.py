"""`%byzer_bench`'s refusals, figures and arithmetic, without a cluster."""
from __future__ import annotations

import pandas as pd
import pytest

from byzer_magic.serving.bench import Sample, prompt_of, summarize
from byzer_magic.frontends.bench_figure import figure
from byzer_magic.frontends.cli import main
from byzer_magic.spec.option_args import validated
from byzer_magic.spec.options import BenchOptions

BAD = [
    ("--concurrency 0", "--concurrency '0' is not a list of concurrency levels: give whole numbers from 1 to 4096 "
                        "separated by commas, e.g. 1,4,16"),
    ("--concurrency 1,x", "--concurrency '1,x' is not a list of concurrency levels"),
    ("--requests -1", "--requests must be 1 or more, got -1"),
    ("--requests 0", "--requests must be 1 or more, got 0"),
    ("--max_tokens 0", "--max_tokens must be 1 or more, got 0"),
    ("--via proxy", "--via 'proxy' is not a way in: use handle or endpoint"),
    ("--prompt hi --prompt_tokens 9", "--prompt_tokens '9' cannot be given with --prompt: give one of the two"),
]


@pytest.mark.parametrize("option,message", BAD)
def test_the_magic_refuses_bad_input_in_one_sentence(shell, capfd, option, message):
    capfd.readouterr()
    shell.run_cell(f"%byzer_bench some_name {option}")
    out, err = capfd.readouterr()
    assert f"UsageError: {message}" in out + err and "Traceback" not in out + err


@pytest.mark.parametrize("option,message", BAD)
def test_the_command_line_refuses_the_same_with_exit_2(capsys, option, message):
    assert main(["bench", "some_name", *option.split()]) == 2
    assert capsys.readouterr().err.startswith(f"byzer-magic bench: {message}")


def test_help_lists_every_option():
    from byzer_magic.frontends.magics import ByzerMagics

    doc = ByzerMagics.byzer_bench.__doc__
    for flag in ("--concurrency", "--requests", "--max_tokens", "--prompt", "--prompt_tokens", "--via", "-o"):
        assert flag in doc, flag


def test_levels_and_prompts():
    options = validated(BenchOptions, {"concurrency": " 1, 4,16", "prompt_tokens": "5"})
    assert options.levels() == [1, 4, 16]
    prompts = {prompt_of(i, options) for i in range(50)}
    assert len(prompts) == 50 and all(len(p.split()) == 5 for p in prompts)
    assert prompt_of(3, validated(BenchOptions, {"prompt": "Say hi"})) == "Say hi"


def test_a_level_summary_follows_vllm_bench_definitions():
    done = [Sample(0.0, first=0.1, ended=1.0, gaps=[0.2, 0.4], tokens=3),
            Sample(0.5, first=0.8, ended=2.0, gaps=[0.6], tokens=2),
            Sample(1.0, ended=1.1, error="provider (HTTP 400): no")]
    row = summarize(2, done, 2.0, "chat")
    assert row["requests"] == 3 and row["errors"] == 1 and row["first_error"] == "provider (HTTP 400): no"
    assert row["requests_per_s"] == 1.0 and row["output_tokens_per_s"] == 2.5 and row["mean_output_tokens"] == 2.5
    assert row["ttft_p50_ms"] == pytest.approx(200) and row["itl_p50_ms"] == pytest.approx(400)
    assert row["e2e_p50_ms"] == pytest.approx(1250) and row["e2e_p99_ms"] == pytest.approx(1495)
    embed = summarize(2, done[:2], 2.0, "embed")
    assert embed["texts_per_s"] == 1.0 and "ttft_p50_ms" not in embed


def test_two_deployments_share_one_figure():
    def frame(name, speed):
        return pd.DataFrame({"deployment": name, "via": "handle", "concurrency": [1, 4],
                             "output_tokens_per_s": [speed, 3 * speed], "ttft_p50_ms": [5, 9], "ttft_p99_ms": [7, 12],
                             "itl_p50_ms": [1, 2], "itl_p99_ms": [2, 3], "e2e_p50_ms": [50, 90], "e2e_p99_ms": [60, 99]})

    throughput, latency = figure([frame("a", 10), frame("b", 20)]).axes
    assert [line.get_label() for line in throughput.lines] == ["a (handle)", "b (handle)"]
    assert list(throughput.lines[1].get_ydata()) == [20, 60]
    assert len(latency.lines) == 12


def test_a_session_name_is_checked_before_anything_is_sent(shell, capfd):
    capfd.readouterr()
    shell.run_cell("%%byzer_chat some_name --session ../etc\nhi")
    out, err = capfd.readouterr()
    assert "UsageError: --session '../etc' is not a valid session name: use letters, digits" in out + err


def test_a_file_store_keeps_turns_private_and_an_empty_session_says_so(tmp_path):
    from byzer_magic.serving import sessions

    store = sessions.FileStore(tmp_path / "sessions")
    assert store.get("s").transcript() == "session 's' is empty"
    sessions.record(store, "s", "hi", "hello", "m1")
    sessions.record(sessions.FileStore(tmp_path / "sessions"), "s", "again", "yes", "m2")
    again = sessions.FileStore(tmp_path / "sessions").get("s")
    assert again.messages() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]
    assert "[2] m2: yes" in again.transcript()
    assert (tmp_path / "sessions" / "s.json").stat().st_mode & 0o777 == 0o600
    sessions.clear(store, "s")
    assert store.get("s").turns == []
