"""The `infini` command's entry point, outside the infini_mlx package.

Importing infini_mlx (MLX, mlx-lm, transformers) takes a second or more; the
command starts here so that Ctrl-C during those imports, or a reader that goes
away (`infini ... | head`), ends it with one line or none, never a traceback.
"""

import os
import sys


def main():
    try:
        from infini_mlx.cli.main import main as run

        try:
            run()
        finally:
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
