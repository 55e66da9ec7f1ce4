"""`python -m pagedserve.entrypoints.openai.api_server --model M ...`: vLLM's module entry point,
for scripts and Dockerfiles that start the server that way. It runs the whole stack exactly as
`pagedserve serve` does, with the same flags."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from pagedserve.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
