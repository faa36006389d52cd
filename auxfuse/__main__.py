"""python -m auxfuse demo | bench"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auxfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from . import bench, demo

    demo.add_arguments(commands.add_parser("demo", help="train GoogLeNet with aux heads on digits"))
    bench.add_arguments(commands.add_parser("bench", help="time the loss against the naive sum; table, JSON, PNG"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo.run(args)
    else:
        bench.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
