"""The serving core: deploy, scale and talk to workers on Ray. Free of IPython; Ray's private parts stay in raydoor."""
