"""`python -m watcher`: the command line (watcher/cli/main.py)."""

from watcher.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
