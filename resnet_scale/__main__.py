import sys

try:
    from resnet_scale.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C before a subcommand catches it (while Python imports the package)
    print("resnet-scale: interrupted (Ctrl-C)", file=sys.stderr)
    code = 130
sys.exit(code)
