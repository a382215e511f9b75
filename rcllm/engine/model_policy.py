"""The correction policy a model is served with when nobody names one.

``rcllm check --sweep`` measures a model's fidelity/speed frontier on held-out requests and
writes the cheapest policy that passed its gate into the model's folder, as ``rcllm-policy.json``
(the embedded model's folder is its converted copy in the user cache). ``serve``, ``eval``,
``demo`` and ``check`` read it from there; a model without that file, a hub id (no folder of
ours to read), or a file measured on other weights gets :data:`FALLBACK_POLICY`, and the reason
says which case it was. The file may also hold label offsets per reuse policy (``rcllm check
--sweep --fit-offsets``), which :func:`gated_label_offsets` reads for the ranker: they choose the
policy's first place (:data:`OFFSETS_DECIDE`); offsets an older rcllm fitted to shift every score
are not served.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from rcllm.engine.models import EMBEDDED_MODELS, embedded_dir
from rcllm.engine.policy import parse_policy
from rcllm.files import write_file

POLICY_FILE = "rcllm-policy.json"
FALLBACK_POLICY = "boundary:2"
REQUIRED_KEYS = ("policy", "fingerprint", "dataset", "requests", "date", "thresholds", "frontier")


@dataclass(frozen=True)
class ModelPolicy:
    policy: str
    gated: bool  # True when it comes from the model's policy file
    reason: str  # one line for the user: where the policy comes from

    def __str__(self) -> str:
        return f"{self.policy} ({self.reason})"


def model_folder(model: str | os.PathLike) -> Path | None:
    """The local folder a model name stands for, without converting or downloading anything:
    an embedded model's converted folder, an existing folder; None for anything else (a hub id)."""
    name = os.fspath(model)
    if name in EMBEDDED_MODELS:
        return embedded_dir(name)
    folder = Path(name).expanduser()
    return folder.resolve() if folder.is_dir() else None


def read_policy_file(path: Path) -> dict:
    """The record of a policy file; a file that is not one is an error naming it (it was written
    atomically, so a broken one was edited by hand)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable policy file ({e}); delete it or rerun `rcllm check --sweep`") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a policy file (a JSON object expected); delete it or rerun `rcllm check --sweep`")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; delete it or rerun `rcllm check --sweep`")
    try:
        parse_policy(record["policy"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}; delete it or rerun `rcllm check --sweep`") from e
    return record


def default_policy(model: str | os.PathLike, fingerprint: str | None = None) -> ModelPolicy:
    """The policy ``model`` is served with by default: the one in its folder's policy file, else
    :data:`FALLBACK_POLICY`. With ``fingerprint`` (the loaded model's), a file measured on other
    weights is not used."""
    folder = model_folder(model)
    if folder is None:
        return ModelPolicy(
            FALLBACK_POLICY, False, f"the default: {os.fspath(model)} is not a local folder, so it has no {POLICY_FILE}"
        )
    path = folder / POLICY_FILE
    if not path.is_file():
        return ModelPolicy(
            FALLBACK_POLICY, False, f"the default: no {POLICY_FILE} in {folder} (`rcllm check --sweep` measures one)"
        )
    record = read_policy_file(path)
    if fingerprint is not None and record["fingerprint"] != fingerprint:
        return ModelPolicy(
            FALLBACK_POLICY, False,
            f"the default: {path} was measured on other weights (fingerprint {str(record['fingerprint'])[:12]}, "
            f"this model {fingerprint[:12]}); rerun `rcllm check --sweep`",
        )
    fitted = record.get("label_offsets")
    offsets = ""
    if isinstance(fitted, dict):
        offsets = (f", with label offsets fitted on {fitted.get('requests', '?')} other requests"
                   if "decides" in fitted else
                   ", its label offsets not served (fitted by an older rcllm; rerun with --fit-offsets)")  # fmt: skip
    return ModelPolicy(
        str(parse_policy(record["policy"])), True,
        f"gated by `rcllm check --sweep` on {record['dataset']}, {record['requests']} requests{offsets}, "
        f"{str(record['date'])[:10]}: {path}",
    )


# what a policy file's label offsets decide; offsets recorded without it were fitted and gated
# when they shifted every label's score, a different ranking from the one served now
OFFSETS_DECIDE = "first place"


def gated_label_offsets(model: str | os.PathLike, fingerprint: str, calibration: str) -> dict[str, list[float]]:
    """The label offsets per reuse policy in ``model``'s policy file, when it was measured on
    these weights (``fingerprint``) with this label-bias correction (``calibration``): offsets
    fitted on one correction mean nothing on another. Empty otherwise, and for offsets recorded
    without ``"decides": "first place"`` (gated as a shift of every score)."""
    folder = model_folder(model)
    path = None if folder is None else folder / POLICY_FILE
    if path is None or not path.is_file():
        return {}
    record = read_policy_file(path)
    fitted = record.get("label_offsets")
    if not fitted or record["fingerprint"] != fingerprint or record.get("calibration") != calibration:
        return {}
    if isinstance(fitted, dict) and "decides" not in fitted:
        return {}
    return check_label_offsets(fitted, path)


def check_label_offsets(fitted: object, where: object) -> dict[str, list[float]]:
    """``fitted["policies"]``, each policy's offsets a list of finite numbers, one per label of a
    ``fitted["candidates"]``-candidate prompt; anything else is an error naming ``where``."""
    def broken(why: str) -> ValueError:
        return ValueError(f"{where}: label_offsets {why}; delete the file or rerun `rcllm check --sweep --fit-offsets`")

    if not isinstance(fitted, dict) or not isinstance(fitted.get("policies"), dict):
        raise broken("must be an object with a 'policies' object")
    if fitted.get("decides") != OFFSETS_DECIDE:
        raise broken(f"must say what they decide ('decides': {OFFSETS_DECIDE!r}), not {fitted.get('decides')!r}")
    n = fitted.get("candidates")
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise broken(f"need the prompt size they were fitted for ('candidates', 2 or more), not {n!r}")
    offsets = {}
    for name, values in fitted["policies"].items():
        try:
            policy = str(parse_policy(name))
        except ValueError as e:
            raise broken(f"name an unknown policy ({e})") from e
        if policy == "full":
            raise broken("name full, the reference, which is never offset")
        if not isinstance(values, list) or len(values) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise broken(f"for {policy} must be {n} finite numbers, one per label")
        offsets[policy] = [float(v) for v in values]
    return offsets


def write_policy_file(folder: Path, record: dict) -> Path:
    """Write ``record`` as ``folder/rcllm-policy.json`` with :func:`rcllm.files.write_file`, so a
    reader sees the old file or the new one, never half of one."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"a policy record needs {', '.join(missing)}")
    parse_policy(record["policy"])
    if "label_offsets" in record:
        check_label_offsets(record["label_offsets"], "the policy record")
    folder = Path(folder)
    path = folder / POLICY_FILE
    write_file(path, json.dumps(record, indent=2) + "\n")
    return path
