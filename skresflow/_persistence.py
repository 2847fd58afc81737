"""Safe model files: tensors plus JSON metadata, read without unpickling code.

A file is written with ``torch.save`` and holds only a dict of strings, numbers
and tensors; :func:`load` reads it with ``torch.load(weights_only=True)``, which
refuses any pickled object other than those, so no code from the file runs.
"""

import hashlib
import json

import numpy as np
import torch

FORMAT = "skresflow-model"
FORMAT_VERSION = 1
_FITTED_ATTRIBUTES = (
    "n_features_in_",
    "feature_names_in_",
    "event_shape_",
    "_input_ndim",
    "n_blocks_",
    "hidden_dims_",
    "n_iter_",
    "history_",
    "logdet_estimator_",
    "scoring_estimator_",
    "classes_",
    "density_weight_",
    "head_",
    "offset_",
    "background_",
)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.device):
        return str(value)
    return value


def save(estimator, path):
    """Write a fitted estimator to ``path`` (see :func:`load`)."""
    from . import __version__

    params = estimator.get_params()
    if not isinstance(params["random_state"], int | None):
        params["random_state"] = None  # a RandomState instance is not data
    metadata = {
        "class": type(estimator).__name__,
        "skresflow_version": __version__,
        "torch_version": torch.__version__,
        "params": _jsonable(params),
        "fitted": {
            name: _jsonable(getattr(estimator, name))
            for name in _FITTED_ATTRIBUTES
            if hasattr(estimator, name)
        },
        "device": str(estimator.device_),
        "dtypes": {
            name: "object" if value.dtype.kind == "O" else value.dtype.str
            for name in _FITTED_ATTRIBUTES
            if isinstance(value := getattr(estimator, name, None), np.ndarray)
        },
    }
    state = {k: v.detach().cpu() for k, v in estimator.flow_.state_dict().items()}
    metadata["sha256"] = _digest(state)
    try:
        text = json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"cannot save {type(estimator).__name__} as a safe model file: a "
            f"fitted value is not plain data ({exc}); class labels must be "
            "numbers, strings or booleans. Use pickle or joblib instead."
        ) from None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": text,
        "state": state,
    }
    torch.save(payload, path)


def _digest(state):
    """SHA-256 of the weights, to detect corrupted or edited files."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load(path, device=None):
    """Read a model written by ``estimator.save(path)``.

    Parameters
    ----------
    path : str or path-like
    device : str, optional
        Where to put the model (default: where it was fitted, when available,
        else the CPU).

    Returns
    -------
    estimator : ResidualFlowDensity, ResidualFlowClassifier or \
ResidualFlowOutlierDetector
        Fitted, with the same scores (and predictions) as the saved estimator.

    Raises
    ------
    ValueError
        If the file is not a skresflow model file, is truncated or corrupted,
        holds pickled objects, was written by a newer format version, or names an
        unknown estimator class. The message names the file.
    """
    payload = _read(path)
    metadata = _metadata(payload, path)
    from . import (
        ResidualFlowClassifier,
        ResidualFlowDensity,
        ResidualFlowOutlierDetector,
    )

    classes = {
        cls.__name__: cls
        for cls in (
            ResidualFlowDensity,
            ResidualFlowClassifier,
            ResidualFlowOutlierDetector,
        )
    }
    cls = classes.get(metadata.get("class"))
    if cls is None:
        raise ValueError(
            f"{path}: unknown estimator class {metadata.get('class')!r}; "
            f"this version reads {sorted(classes)}."
        )
    estimator = cls(**_params(metadata["params"]))
    try:
        return estimator._restore(metadata, payload["state"], device)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _read(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for bad files
        kind = (
            "it holds pickled objects that a model file never contains"
            if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__
            else "it is truncated, corrupted or not a torch file"
        )
        raise ValueError(
            f"{path}: not a readable skresflow model file: {kind} "
            f"({type(exc).__name__}: {str(exc)[:200]})."
        ) from None


def _metadata(payload, path):
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a skresflow model file (no '{FORMAT}' header).")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: written in model-file format version {version!r}; "
            f"this skresflow reads versions up to {FORMAT_VERSION}. "
            "Upgrade skresflow to read it."
        )
    try:
        metadata = json.loads(payload["metadata"])
        state = payload["state"]
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupted skresflow model file ({exc}).") from None
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{path}: corrupted skresflow model file (bad weights).")
    if metadata.get("sha256") != _digest(state):
        raise ValueError(
            f"{path}: the weights do not match the file's checksum; the "
            "file was corrupted or edited after it was saved."
        )
    return metadata


def _params(params):
    tuples = ("hidden_dims", "image_shape")
    return {
        k: tuple(v) if k in tuples and isinstance(v, list) else v
        for k, v in params.items()
    }
