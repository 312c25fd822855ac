"""Datasets by name: a loader function that returns dataset records, plus metadata.

Record format (one dict per image; what every loader returns and every mapper reads)::

    {"file_name": str (path of the image), "image_id": int, "height": int, "width": int,
     "annotations": [{"bbox": [x0, y0, x1, y1] (float, absolute pixels, XYXY),
                      "category_id": int (contiguous, 0..K-1),
                      "iscrowd": 0 or 1,
                      "segmentation": COCO polygons (list of flat [x, y, ...] lists) or an RLE
                                      dict; the key is absent when the object has no mask},
                     ...]}

Metadata (``get_metadata(name)``): ``thing_classes`` (list of K names, index = contiguous id),
``thing_dataset_id_to_contiguous_id`` (dict: category id in the json -> contiguous id),
``json_file`` and ``image_root`` for COCO-format datasets, ``evaluator_type`` ("coco").
Metadata that needs the dataset's files (the classes of a COCO json, say) can be registered as a
``lazy_metadata`` function: it runs on the first access of an attribute that is not set yet.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

_LOADERS: dict[str, Callable[[], list[dict]]] = {}
_METADATA: dict[str, "Metadata"] = {}
_LAZY_METADATA: dict[str, Callable[[], dict[str, Any]]] = {}


class Metadata(SimpleNamespace):
    """Metadata of one dataset; attributes missing at first are filled by its lazy function."""

    def __getattr__(self, key: str) -> Any:
        # Only reached when ordinary lookup fails. Dunder lookups (pickling, copy) must not
        # trigger file I/O.
        name = self.__dict__.get("name")
        if not key.startswith("__") and _METADATA.get(name) is self and name in _LAZY_METADATA:
            fill = _LAZY_METADATA.pop(name)
            try:
                fields = fill()
            except BaseException:
                _LAZY_METADATA[name] = fill
                raise
            for field, value in fields.items():
                self.__dict__.setdefault(field, value)
            if key in self.__dict__:
                return self.__dict__[key]
        raise AttributeError(f"Metadata of dataset '{name}' has no attribute '{key}'")


def register_dataset(
    name: str,
    loader: Callable[[], list[dict]],
    *,
    lazy_metadata: Callable[[], dict[str, Any]] | None = None,
    **metadata: Any,
) -> None:
    """Register ``loader`` (called lazily, returns records) and its metadata under ``name``.

    ``lazy_metadata`` (optional) returns more metadata fields; it is called once, on the first
    access of a field that ``metadata`` does not set. Registering the same name again replaces
    the entry, so that configs can be loaded twice in one process.
    """
    _LOADERS[name] = loader
    _METADATA[name] = Metadata(name=name, **metadata)
    _LAZY_METADATA.pop(name, None)
    if lazy_metadata is not None:
        _LAZY_METADATA[name] = lazy_metadata


def is_registered(name: str) -> bool:
    return name in _LOADERS


def registered_names() -> list[str]:
    return sorted(_LOADERS)


def _check(name: str) -> None:
    if name not in _LOADERS:
        known = ", ".join(registered_names()) or "(none)"
        raise KeyError(
            f"Dataset '{name}' is not registered. Registered datasets: {known}. A COCO-format "
            "dataset can be registered from the config with DATASETS.REGISTER "
            "[[name, annotation_json, image_folder]] (train_net.py and the tools register them; "
            "a script calls boxteacher.data.register_datasets_from_config(cfg))."
        )


def get_dataset_records(name: str) -> list[dict]:
    """The records of dataset ``name`` (see the module docstring for their format)."""
    _check(name)
    return _LOADERS[name]()


def get_metadata(name: str) -> Metadata:
    _check(name)
    return _METADATA[name]
