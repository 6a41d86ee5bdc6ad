"""The entry points' command-line wrapper: a SaticError becomes one 'error: ...' line and exit status 2.
(Split out of misc/fileio.py.)"""
import sys

from misc.errors import SaticError


def run_cli(parse_args, run, argv=None):
    """Parse argv, call run(args): 0 when it completes; a SaticError becomes one 'error: <msg>' line on stderr and
    exit status 2; Ctrl-C one 'interrupted' line and 130 (what was already written stays complete: every output
    is written atomically)."""
    try:
        args = parse_args(argv)  # a refused option value: SaticError (opts.OptionParser), one line
        run(args)
    except SaticError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: outputs not yet written were not written', file=sys.stderr)
        return 130
    return 0
