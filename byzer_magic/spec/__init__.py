"""What a deployment is asked to be: the typed flags, their argparse form and the validated deploy spec."""
