"""What the user touches: the IPython magics, the command line and the status card. Thin: they parse, call the serving core and print."""
