"""Keys for the tcp links between stages: ZeroMQ CURVE (encryption and authentication), one keypair per deployment.

Every invocation of a run holds the same keypair: each receiving socket is a CURVE server with it, each sending
socket a client with it, and the ZAP handler of every process with a bound tcp socket admits only clients whose
public key is that one. A peer without the secret key fails at the handshake and never reaches a stage.
A single invocation makes a fresh keypair per run; invocations of a split run (`--stages`) read one key file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from voxtral_run.runner.errors import RunnerError

KEYS_VARIABLE = "VOXTRAL_RUN_KEYS"  # the key file's path, where --keys does not give it
KEY_FILE_MODE = 0o600
_KEY_FILE_TEXT = """#   voxtral-run CURVE key: every invocation of a split run needs this same file; keep it private.
#   ZeroMQ CURVE **Secret** Certificate (pyzmq's zmq.auth.load_certificate reads it)

metadata
curve
    public-key = "{public}"
    secret-key = "{secret}"
"""


@dataclass(frozen=True)
class CurveKeys:
    """A deployment's CURVE keypair, Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        """A fresh keypair, for a run no other invocation joins."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def default_key_file() -> Path:
    """Where a split run keeps its key unless --keys or VOXTRAL_RUN_KEYS says: the user's config folder."""
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "voxtral-run" / "curve.key"


def load_or_create_key_file(path: Path, option: str) -> CurveKeys:
    """The keypair in `path`, created (mode 0600) if the file does not exist; a one-line RunnerError, naming
    `option`, for a file others can read or one that holds no keypair."""
    if not path.exists():
        _create_key_file(path, option)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise RunnerError(f"{option} {path}: cannot read the key file ({error.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RunnerError(f"{option} {path}: the key file is readable by others; run chmod 600 {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise RunnerError(f"{option} {path}: not a voxtral-run key file ({error})") from None
    if secret is None or len(public) != 40 or len(secret) != 40:
        raise RunnerError(f"{option} {path}: not a voxtral-run key file (no CURVE secret key)")
    return CurveKeys(public, secret)


def _create_key_file(path: Path, option: str) -> None:
    public, secret = zmq.curve_keypair()
    text = _KEY_FILE_TEXT.format(public=public.decode(), secret=secret.decode())
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_FILE_MODE)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        # A link appears whole, and fails if the file exists: invocations starting at once on a shared folder
        # all use the first key written.
        os.link(staging, path)
    except FileExistsError:
        pass
    except OSError as error:
        raise RunnerError(f"{option} {path}: cannot create the key file ({error.strerror})") from None
    finally:
        staging.unlink(missing_ok=True)


class _OnlyOurKey:
    """ZAP credentials check: the one public key of the deployment."""

    def __init__(self, public: bytes):
        self._public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._public


def start_authenticator(context: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    """Answer the CURVE handshakes of `context`'s bound sockets: only clients with the deployment's key pass."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=_OnlyOurKey(keys.public))
    return authenticator


def make_server(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make a bound socket a CURVE server (set before bind)."""
    socket.curve_server = True
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret


def make_client(socket: zmq.Socket, keys: CurveKeys) -> None:
    """Make a connecting socket a CURVE client of a server holding the same keys (set before connect)."""
    socket.curve_serverkey = keys.public
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
