"""A volume's secrets: S3 credentials and the ZeroFS encryption password.

They never come from parameters or a ConfigMap: they are the CSI secrets of the call
(``csi.storage.k8s.io/node-stage-secret-*``, ``provisioner-secret-*``), parsed by
``VolumeSecrets.from_csi_secrets``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from zerofs_csi import errors

# Keys of the CSI secret (a Kubernetes Secret's data). The AWS names match the Go
# driver's credentials Secret so an existing Secret can be referenced directly.
SECRET_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
SECRET_SESSION_TOKEN = "AWS_SESSION_TOKEN"
SECRET_ENCRYPTION_PASSWORD = "ZEROFS_ENCRYPTION_PASSWORD"
SECRET_CONDITIONAL_PUT_URL = "ZEROFS_CONDITIONAL_PUT_URL"
# ZeroFS 2.3 refuses to start with a shorter encryption password (counted in bytes), or
# with its config template's placeholder (zerofs/src/cli/password.rs, seen at start:
# "Password validation failed: Password must be at least 8 characters long").
MIN_ENCRYPTION_PASSWORD_BYTES = 8
PLACEHOLDER_ENCRYPTION_PASSWORD = "CHANGEME"


@dataclass(frozen=True, repr=False)
class VolumeSecrets:
    """S3 credentials and the ZeroFS encryption password of a volume.

    ``repr``/``str`` list which secrets are present, never their values.
    """

    encryption_password: str
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    # A redis:// URL for [aws] conditional_put that may carry a password.
    conditional_put_url: str | None = None

    def __repr__(self) -> str:
        present = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        return f"VolumeSecrets(<redacted: {', '.join(present)}>)"

    __str__ = __repr__

    def check_server_accepts_password(self) -> None:
        """InvalidArgument when ZeroFS would refuse the encryption password at start: its
        server would exit at every start of the volume."""
        if len(self.encryption_password.encode()) < MIN_ENCRYPTION_PASSWORD_BYTES:
            raise errors.InvalidArgument(
                f"secret key {SECRET_ENCRYPTION_PASSWORD!r} must be at least "
                f"{MIN_ENCRYPTION_PASSWORD_BYTES} bytes long: ZeroFS refuses a shorter one"
            )
        if self.encryption_password == PLACEHOLDER_ENCRYPTION_PASSWORD:
            raise errors.InvalidArgument(
                f"secret key {SECRET_ENCRYPTION_PASSWORD!r} is ZeroFS's config template "
                "placeholder, which ZeroFS refuses: choose a password"
            )

    @classmethod
    def from_csi_secrets(cls, secrets: Mapping[str, str]) -> VolumeSecrets:
        """Parse the secrets map of a CSI call. Unrelated keys are ignored.

        Errors name the missing or malformed key, never a value.
        """

        def get(key: str) -> str | None:
            value = secrets.get(key)
            if value is None or value == "":
                return None
            if "\x00" in value:
                # Environment variables cannot carry NUL, and ZeroFS gets these via env.
                raise errors.InvalidArgument(f"secret key {key!r} contains a NUL character")
            return value

        password = get(SECRET_ENCRYPTION_PASSWORD)
        if password is None:
            raise errors.InvalidArgument(
                f"secret key {SECRET_ENCRYPTION_PASSWORD!r} (the ZeroFS encryption password) "
                "is missing: reference a Secret that has it with the StorageClass parameters "
                "csi.storage.k8s.io/node-stage-secret-name/-namespace and "
                "csi.storage.k8s.io/provisioner-secret-name/-namespace"
            )
        access_key_id = get(SECRET_ACCESS_KEY_ID)
        secret_access_key = get(SECRET_SECRET_ACCESS_KEY)
        session_token = get(SECRET_SESSION_TOKEN)
        if (access_key_id is None) != (secret_access_key is None):
            raise errors.InvalidArgument(
                f"secret keys {SECRET_ACCESS_KEY_ID!r} and {SECRET_SECRET_ACCESS_KEY!r} must "
                "be given together (or both left out to use the node's ambient credentials)"
            )
        if session_token is not None and access_key_id is None:
            raise errors.InvalidArgument(
                f"secret key {SECRET_SESSION_TOKEN!r} needs {SECRET_ACCESS_KEY_ID!r} and "
                f"{SECRET_SECRET_ACCESS_KEY!r}"
            )
        conditional_put_url = get(SECRET_CONDITIONAL_PUT_URL)
        if conditional_put_url is not None and not conditional_put_url.startswith(
            ("redis://", "rediss://")
        ):
            raise errors.InvalidArgument(
                f"secret key {SECRET_CONDITIONAL_PUT_URL!r} must be a redis:// or rediss:// URL"
            )
        return cls(
            encryption_password=password,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            conditional_put_url=conditional_put_url,
        )
