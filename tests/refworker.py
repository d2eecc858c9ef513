"""Launch the reference aiohttp worker (funcnodes-worker 1.6.0) for side-by-side tests.

Usage: python tests/refworker.py --host 127.0.0.1 --port P --data-path D --uuid U

Set FUNCNODES_CONFIG_DIR in the environment *before* starting this script: funcnodes_core
reads it at import time.
"""

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--uuid", required=True)
    args = parser.parse_args(argv)

    # Imported late so that --help works without the reference installed.
    from funcnodes_worker import WSWorker

    worker = WSWorker(host=args.host, port=args.port, data_path=args.data_path, uuid=args.uuid)
    worker.run_forever()


if __name__ == "__main__":
    main()
