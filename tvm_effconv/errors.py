"""Errors a user can act on.

Every error raised for bad input derives from :class:`EffconvError`; the command-line tools print its
message (which names the problem and the fix) and exit with status 2, without a traceback.
"""

import sys
import warnings


class EffconvError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class UnknownPresetError(EffconvError):
    pass


class ModelLoadError(EffconvError):
    pass


class UnsupportedOpsError(EffconvError):
    pass


class ToolMissingError(EffconvError):
    pass


class DeviceError(EffconvError):
    """The device (RPC server, emulated or real) is unreachable, died, or cannot run the artifact."""


class LayerParameterError(EffconvError, ValueError):
    """A layer was constructed with a parameter outside what it supports."""


class VerificationError(EffconvError):
    pass


class ArtifactError(EffconvError):
    """The artifact folder is missing, incomplete, corrupt or altered."""


def run_cli(main, argv=None):
    """Run a command-line ``main(argv) -> int``, turning EffconvError into a one-line message."""
    # torch's export and jit machinery warn about their own internals on every call; users can't act on it.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is deprecated. Please switch to")
    try:
        code = main(argv)
    except EffconvError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
