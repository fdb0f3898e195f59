"""collapse: neural-collapse metrics of last-layer hidden states, from Python.

A thin layer over the engine's C API (libcollapse.so, include/collapse/collapse.h):

    import collapse
    cfg = collapse.Config(exclude_token_ids=[0, 1, 2], compute_nc4=True)  # any key of configs/default.yaml
    s = collapse.Session(cfg, num_classes=512)
    s.set_classifier(W)                                  # numpy or torch, [V, d]
    s.ingest(features, labels)                           # [N, d] + [N], any number of batches
    rep = s.compute()
    rep["overall_gnc2"], rep.token_ids, rep.token_array("svd_entropy"), rep.to_dict()

Inputs are read where they are (no copy): numpy arrays through the array interface, torch CPU
tensors through data_ptr()/stride(), torch CUDA tensors (and __cuda_array_interface__ objects) as
device memory on the tensor's current stream (a session with backend: cuda). Rows may be strided
(a row stride that is a whole number of elements, >= the row width); the elements of a row must be
contiguous. A layout the engine cannot read in place (a non-contiguous row, negative or zero
strides, byte-swapped data) raises ValueError naming the input and the fix instead of copying
silently. Python lists and other array-likes are converted with numpy.asarray (a copy).

Errors: every engine error raises a collapse.Error subclass that also derives from the usual
Python type, carrying the engine's message (str(e)) and its status (e.status, e.status_name):

    status (collapse.h)            exception               also a
    COLLAPSE_ERR_INVALID_ARGUMENT  InvalidArgumentError    ValueError
    COLLAPSE_ERR_CONFIG            ConfigError             ValueError
    COLLAPSE_ERR_IO                CollapseIOError         OSError
    COLLAPSE_ERR_BAD_INPUT         BadInputError           ValueError
    COLLAPSE_ERR_SHAPE             ShapeError              ValueError
    COLLAPSE_ERR_STATE             StateError              RuntimeError
    COLLAPSE_ERR_OUT_OF_MEMORY     OutOfMemoryError        MemoryError
    COLLAPSE_ERR_NO_CUDA           NoCudaError             RuntimeError
    COLLAPSE_ERR_NOT_FOUND         NotFoundError           KeyError
    COLLAPSE_ERR_INTERNAL          InternalError           RuntimeError

Input layouts the Python layer refuses before the engine sees them raise InvalidArgumentError /
ShapeError too (a TypeError for an object that is no array at all).
"""
import json
import math
import os
import re
import sys

import numpy as np

from . import _collapse as _native

__all__ = [
    "Config", "Session", "Report", "analyze", "version", "backend_available",
    "Error", "InvalidArgumentError", "ConfigError", "CollapseIOError", "BadInputError", "ShapeError",
    "StateError", "OutOfMemoryError", "NoCudaError", "NotFoundError", "InternalError",
]

# ---------------------------------------------------------------- errors


class Error(Exception):
    """An engine error: str(e) is the engine's message, e.status its collapse_status code."""

    status = 10
    status_name = "COLLAPSE_ERR_INTERNAL"

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):  # KeyError would quote the message
        return self.message


def _error_class(name, status, status_name, base):
    return type(name, (Error, base), {"status": status, "status_name": status_name, "__module__": __name__})


InvalidArgumentError = _error_class("InvalidArgumentError", 1, "COLLAPSE_ERR_INVALID_ARGUMENT", ValueError)
ConfigError = _error_class("ConfigError", 2, "COLLAPSE_ERR_CONFIG", ValueError)
CollapseIOError = _error_class("CollapseIOError", 3, "COLLAPSE_ERR_IO", OSError)
BadInputError = _error_class("BadInputError", 4, "COLLAPSE_ERR_BAD_INPUT", ValueError)
ShapeError = _error_class("ShapeError", 5, "COLLAPSE_ERR_SHAPE", ValueError)
StateError = _error_class("StateError", 6, "COLLAPSE_ERR_STATE", RuntimeError)
OutOfMemoryError = _error_class("OutOfMemoryError", 7, "COLLAPSE_ERR_OUT_OF_MEMORY", MemoryError)
NoCudaError = _error_class("NoCudaError", 8, "COLLAPSE_ERR_NO_CUDA", RuntimeError)
NotFoundError = _error_class("NotFoundError", 9, "COLLAPSE_ERR_NOT_FOUND", KeyError)
InternalError = _error_class("InternalError", 10, "COLLAPSE_ERR_INTERNAL", RuntimeError)

_ERRORS = {c.status: c for c in (InvalidArgumentError, ConfigError, CollapseIOError, BadInputError, ShapeError,
                                 StateError, OutOfMemoryError, NoCudaError, NotFoundError, InternalError)}


def _make_error(status, message):
    return _ERRORS.get(status, InternalError)(message)


_native._set_error_factory(_make_error)


def version():
    """The engine's version string."""
    return _native.version()


def backend_available(name):
    """True when the backend ("cpu", "cuda") is compiled in and usable on this machine."""
    return _native.backend_available(name)


# ---------------------------------------------------------------- config

# A string value goes into the YAML text plain when YAML reads it back as that same text (an enum,
# a byte size like 64MiB, a path without specials), else double-quoted (JSON is valid YAML).
_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_.:/+-]*$|^[0-9][0-9.]*[A-Za-z][A-Za-z]*$")


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _yaml_value(v):
    if v is None:
        return "null"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isfinite(v):
            return repr(v)
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf")
    if isinstance(v, str):
        return v if _PLAIN.match(v) and v.lower() not in ("null", "true", "false", "yes", "no", "on", "off", "~") \
            else json.dumps(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_yaml_value(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)) + "]"
    raise TypeError(f"collapse.Config: a value of type {type(v).__name__} is not a YAML scalar or list: {v!r}")


class Config:
    """An engine configuration: any key of configs/default.yaml as a keyword.

    The keywords become YAML text that the engine parses and validates itself, so a bad key or
    value raises ConfigError with the engine's message ("collapse.Config:<n>: ..." where n is the
    keyword's position, as a line of a file would be named).
    """

    def __init__(self, **kwargs):
        # A key is a name: pasted into the text, "a: 1\nb" would have been two keys.
        for k in kwargs:
            if not _KEY.match(k):
                raise ConfigError(f"collapse.Config: {k!r} is not a config key (keys are names like min_samples_per_token)")
        text = "".join(f"{k}: {_yaml_value(v)}\n" for k, v in kwargs.items())
        self._init(text, "collapse.Config", dict(kwargs))

    def _init(self, text, source, keys):
        _native.check_config(text, source)
        self._yaml = text
        self._source = source
        self._keys = keys

    @classmethod
    def from_yaml(cls, path):
        """A config file, read and validated by the engine (messages name the file and line)."""
        path = os.fspath(path)
        _native.check_config_file(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        cfg = cls.__new__(cls)
        cfg._init(text, path, None)
        return cfg

    @classmethod
    def from_yaml_string(cls, text, source="config"):
        """YAML text, validated by the engine (messages name `source`)."""
        cfg = cls.__new__(cls)
        cfg._init(text, source, None)
        return cfg

    @property
    def yaml(self):
        """The YAML text the engine reads."""
        return self._yaml

    def __repr__(self):
        if self._keys is not None:
            return "collapse.Config(" + ", ".join(f"{k}={v!r}" for k, v in self._keys.items()) + ")"
        return f"collapse.Config.from_yaml({self._source!r})"


def _config(cfg):
    if cfg is None:
        return Config()
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return Config(**cfg)
    if isinstance(cfg, (str, os.PathLike)):
        return Config.from_yaml(cfg)
    raise TypeError(f"config must be a collapse.Config, a dict of keys or a YAML path, not {type(cfg).__name__}")


# ---------------------------------------------------------------- buffers

# collapse_dtype and collapse_memory of collapse.h
_F32, _F16, _BF16, _F64, _I32, _I64, _U8, _BOOL = range(8)
_HOST, _DEVICE = 0, 1
_NUMPY_DTYPES = {"float32": _F32, "float16": _F16, "bfloat16": _BF16, "float64": _F64, "int32": _I32,
                 "int64": _I64, "uint8": _U8, "bool": _BOOL}
_DTYPE_NAMES = {v: k for k, v in _NUMPY_DTYPES.items()}
_TYPESTR = {"f4": _F32, "f2": _F16, "f8": _F64, "i4": _I32, "i8": _I64, "u1": _U8, "b1": _BOOL}


def _is_torch(x):
    t = sys.modules.get("torch")
    return t is not None and isinstance(x, t.Tensor)


def _torch_dtype(x, what):
    import torch
    table = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16, torch.float64: _F64,
             torch.int32: _I32, torch.int64: _I64, torch.uint8: _U8, torch.bool: _BOOL}
    if x.dtype not in table:
        raise InvalidArgumentError(f"{what}: torch dtype {x.dtype} is not supported "
                                   "(float16, bfloat16, float32, float64, int32, int64, uint8, bool)")
    return table[x.dtype]


class _View:
    """A buffer as collapse_buffer describes it, plus the object that owns the memory."""

    __slots__ = ("ptr", "dtype", "memory", "shape", "strides", "itemsize", "owner", "stream", "device")

    def desc(self, what):
        """(ptr, dtype, memory, rows, cols, row_stride) of a 1-D or 2-D view."""
        shape, strides = self.shape, self.strides
        if len(shape) == 1:
            rows, cols = shape[0], 1
            rs, cs = strides[0], self.itemsize
        elif len(shape) == 2:
            rows, cols = shape
            rs, cs = strides
        else:
            raise ShapeError(f"{what}: expected 1 or 2 dimensions, got shape {tuple(shape)}")
        if cols > 1 and cs != self.itemsize:
            raise InvalidArgumentError(
                f"{what}: the elements of a row are not contiguous (strides {tuple(strides)} bytes, element size "
                f"{self.itemsize}); collapse reads the caller's memory without copying: pass a copy with contiguous "
                "rows (numpy.ascontiguousarray, tensor.contiguous())")
        if rows <= 1:
            row_stride = 0
        else:
            if rs <= 0 or rs % self.itemsize != 0 or rs // self.itemsize < cols:
                raise InvalidArgumentError(
                    f"{what}: row stride {rs} bytes cannot be read in place (it must be a positive multiple of the "
                    f"element size {self.itemsize} and at least a row, {cols} elements); pass a contiguous copy")
            row_stride = rs // self.itemsize
            if row_stride == cols:
                row_stride = 0
        return (self.ptr, self.dtype, self.memory, int(rows), int(cols), int(row_stride))


def _view(x, what):
    v = _View()
    v.stream = None
    v.device = None
    if _is_torch(x):
        v.dtype = _torch_dtype(x, what)
        v.itemsize = x.element_size()
        v.shape = tuple(x.shape)
        v.strides = tuple(s * v.itemsize for s in x.stride())
        v.ptr = x.data_ptr()
        v.owner = x
        if x.device.type == "cuda":
            import torch
            v.memory = _DEVICE
            v.device = x.device
            v.stream = torch.cuda.current_stream(x.device).cuda_stream
        elif x.device.type == "cpu":
            v.memory = _HOST
        else:
            raise InvalidArgumentError(f"{what}: torch tensors on {x.device.type} are not supported (cpu, cuda)")
        return v
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        typestr = cai["typestr"]
        if typestr[0] == ">" or typestr[1:] not in _TYPESTR:
            raise InvalidArgumentError(f"{what}: __cuda_array_interface__ typestr {typestr} is not supported")
        v.dtype = _TYPESTR[typestr[1:]]
        v.itemsize = int(typestr[2:])
        v.shape = tuple(cai["shape"])
        st = cai.get("strides")
        if st is None:  # C-contiguous
            st, acc = [], v.itemsize
            for n in reversed(v.shape):
                st.insert(0, acc)
                acc *= n
        v.strides = tuple(st)
        v.ptr = int(cai["data"][0])
        v.memory = _DEVICE
        v.owner = x
        s = cai.get("stream")
        v.stream = int(s) if s not in (None, 1, 2) else None  # 1 / 2: the legacy / per-thread default stream
        return v
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype.name not in _NUMPY_DTYPES:
        raise InvalidArgumentError(f"{what}: dtype {a.dtype} is not supported "
                                   "(float16, bfloat16, float32, float64, int32, int64, uint8, bool)")
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder != "little"):
        raise InvalidArgumentError(f"{what}: big-endian data; pass a.astype(a.dtype.newbyteorder('<'))")
    v.dtype = _NUMPY_DTYPES[a.dtype.name]
    v.itemsize = a.dtype.itemsize
    v.shape = a.shape
    v.strides = a.strides
    v.ptr = a.__array_interface__["data"][0]
    v.memory = _HOST
    v.owner = a
    return v


def _host_ids(x, what):
    """Sequence ids / positions must be host memory (collapse.h): a CUDA tensor is copied (they are small)."""
    if _is_torch(x) and x.device.type != "cpu":
        x = x.cpu()
    elif getattr(x, "__cuda_array_interface__", None) is not None:
        raise InvalidArgumentError(f"{what} must be host memory (numpy or a CPU tensor)")
    return _view(x, what)


def _labels_desc(v, what):
    # [N] or [N, 1]: a column is a 1-D buffer with its row stride.
    if len(v.shape) == 2 and v.shape[1] == 1:
        v.shape, v.strides = (v.shape[0],), (v.strides[0],)
    if len(v.shape) != 1:
        raise ShapeError(f"{what}: expected shape [N] or [N, 1], got {tuple(v.shape)}")
    return v.desc(what)


def _stream_of(*views):
    for v in views:
        if v is not None and v.memory == _DEVICE and v.stream is not None:
            return v.stream
    return 0


# ---------------------------------------------------------------- reports


class Report:
    """A computed report. to_dict() is the JSON report (docs/METRICS.md, schema/report.schema.json)."""

    def __init__(self, native):
        self._native = native

    def to_dict(self):
        """The report as a dict: exactly the JSON report's structure (a fresh copy each call)."""
        return json.loads(self._native.json())

    @property
    def json(self):
        """The JSON text of the report."""
        return self._native.json()

    def __getitem__(self, key):
        """A scalar metric (None when null): an overall_analysis, summary or counts key ("overall_gnc2",
        "rows_kept") or a section-qualified one ("window_summary.overall_avg_svd_entropy"); a whole
        top-level section ("token_analysis") as a dict."""
        try:
            return self._native.scalar(key)
        except NotFoundError:
            d = self.to_dict()
            if key in d:
                return d[key]
            raise

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    @property
    def token_ids(self):
        """Ids of the analysed tokens (token_analysis), ascending, as int64."""
        return self._native.token_ids()

    def token_array(self, name):
        """A per-token array in token_ids order: svd_entropy, effective_rank, normalized_entropy,
        num_samples, svd_rows (float64; NaN for null)."""
        return self._native.token_array(name)

    def write_json(self, path):
        self._native.write_json(os.fspath(path))

    def __repr__(self):
        return f"<collapse.Report: {len(self.token_ids)} tokens, overall_gnc2={self.get('overall_gnc2')}>"


# ---------------------------------------------------------------- sessions


class Session:
    """One analysis: ingest batches, then compute() once (snapshot() any time before)."""

    def __init__(self, config=None, num_classes=None, dim=None):
        cfg = _config(config)
        self.config = cfg
        self._native = _native.Session(cfg.yaml, cfg._source, int(num_classes or 0), int(dim or 0))

    def close(self):
        """Frees the engine's session (also done when the object is collected)."""
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_classifier(self, weight, bias=None):
        """The classifier W [V, d] (and bias [V]); copied by the engine."""
        w = _view(weight, "classifier")
        if len(w.shape) != 2:
            raise ShapeError(f"classifier: expected shape [V, d], got {tuple(w.shape)}")
        b = None if bias is None else _labels_desc(_view(bias, "bias"), "bias")
        self._native.set_classifier(w.desc("classifier"), b)

    def ingest(self, features, labels, valid=None, sequence_ids=None, positions=None):
        """Rows: features [N, d], labels [N] (int32/int64; -100 = no target), valid [N] (nonzero = keep),
        sequence_ids / positions [N] for the generation-time window entropy."""
        if positions is not None and sequence_ids is None:
            raise InvalidArgumentError("positions needs sequence_ids")
        x = _view(features, "features")
        if len(x.shape) != 2:
            raise ShapeError(f"features: expected shape [N, d], got {tuple(x.shape)}")
        y = _view(labels, "labels")
        m = None if valid is None else _view(valid, "valid")
        s = None if sequence_ids is None else _host_ids(sequence_ids, "sequence_ids")
        p = None if positions is None else _host_ids(positions, "positions")
        self._native.ingest_rows(x.desc("features"), _labels_desc(y, "labels"),
                                 None if m is None else _labels_desc(m, "valid"),
                                 None if s is None else _labels_desc(s, "sequence_ids"),
                                 None if p is None else _labels_desc(p, "positions"), _stream_of(x, y, m))

    def ingest_sequences(self, hidden, input_ids, attention_mask=None):
        """Sequences: hidden [B, T, d], input_ids [B, T], attention_mask [B, T]. Rows are hidden[:, :-1]
        with labels input_ids[:, 1:], kept where attention_mask[:, 1:] != 0; sequence b of the i-th
        call is tagged as the session's next sequence (window metrics). hidden is read in place when
        it is one strided [B*T, d] block (any contiguous [B, T, d]); another view (hidden[:, :T] of a
        longer buffer) is copied once, so that a batch that fails changes nothing."""
        h = _view(hidden, "hidden")
        ids = _view(input_ids, "input_ids")
        m = None if attention_mask is None else _view(attention_mask, "attention_mask")
        if len(h.shape) != 3:
            raise ShapeError(f"hidden: expected shape [B, T, d], got {tuple(h.shape)}")
        B, T, d = h.shape
        if len(ids.shape) != 2 or tuple(ids.shape) != (B, T):
            raise ShapeError(f"input_ids: expected shape [B, T] = [{B}, {T}] (hidden is {tuple(h.shape)}), "
                             f"got {tuple(ids.shape)}")
        if m is not None and tuple(m.shape) != (B, T):
            raise ShapeError(f"attention_mask: expected shape [B, T] = [{B}, {T}], got {tuple(m.shape)}")
        if B > 1 and h.strides[0] != T * h.strides[1]:
            # Not one strided [B*T, d] block (hidden[:, :T] of a longer buffer, a [T, B, d] buffer
            # seen as [B, T, d]): copied once, so that the batch stays one engine call, which
            # changes nothing when it fails (a call per sequence kept the sequences before a bad one).
            if _is_torch(hidden):
                hidden = hidden.contiguous()
            elif getattr(hidden, "__cuda_array_interface__", None) is None:
                hidden = np.ascontiguousarray(h.owner)
            else:  # another library's device array: its own copy is its business
                raise InvalidArgumentError(f"hidden: a device array of shape {tuple(h.shape)} and strides {tuple(h.strides)} "
                                           "that is not one strided [B*T, d] block; pass a contiguous one "
                                           "(e.g. cupy.ascontiguousarray)")
            h = _view(hidden, "hidden")
        flat = _View()
        for k in _View.__slots__:
            setattr(flat, k, getattr(h, k))
        flat.shape, flat.strides = (B * T, d), (h.strides[1], h.strides[2])
        self._native.ingest_sequences(flat.desc("hidden"), ids.desc("input_ids"),
                                      None if m is None else m.desc("attention_mask"), B, T, _stream_of(h, ids, m))

    def sync(self):
        """Waits for queued device work (CUDA) and raises a deferred error; a no-op on the CPU."""
        self._native.sync()

    def needs_second_pass(self):
        return self._native.needs_second_pass()

    def begin_second_pass(self):
        self._native.begin_second_pass()

    def save(self, path):
        self._native.save(os.fspath(path))

    def load(self, path):
        self._native.load(os.fspath(path))

    def merge(self, path):
        self._native.merge(os.fspath(path))

    def snapshot(self):
        """A report of the rows so far; the session goes on ingesting."""
        return Report(self._native.snapshot())

    def compute(self):
        """Finalises and computes every metric (once per session)."""
        return Report(self._native.compute())


# ---------------------------------------------------------------- offline analysis

_ANALYZE_INPUTS = ("features", "labels", "valid", "sequence_ids", "positions", "hidden", "input_ids",
                   "attention_mask", "classifier", "bias")


def analyze(features=None, labels=None, valid=None, sequence_ids=None, positions=None, hidden=None,
            input_ids=None, attention_mask=None, classifier=None, bias=None, config=None, num_classes=None,
            batch_rows=None, output=None):
    """What `collapse analyze` does, on .npy files (the same driver inside the engine: batches read
    with pread, the second pass when a metric needs it, the input provenance in the report).
    Give the rows layout (features, labels, [valid, sequence_ids, positions]) or the sequence layout
    (hidden, input_ids, [attention_mask]) as paths; classifier/bias paths; config a Config, a dict
    or a YAML path. Writes `output` when given. Returns a Report."""
    given = {}
    args = dict(features=features, labels=labels, valid=valid, sequence_ids=sequence_ids, positions=positions,
                hidden=hidden, input_ids=input_ids, attention_mask=attention_mask, classifier=classifier, bias=bias)
    for k in _ANALYZE_INPUTS:
        p = args[k]
        if p is None:
            continue
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"analyze: {k} must be a path to a .npy file, not {type(p).__name__} "
                            "(arrays in memory go through collapse.Session)")
        given[k] = os.fspath(p)
    cfg = None if config is None else _config(config)
    command = "collapse.analyze(" + ", ".join(f"{k}={v!r}" for k, v in given.items()) + ")"
    rep = Report(_native.analyze_files(given, None if cfg is None else cfg.yaml,
                                       "config" if cfg is None else cfg._source, int(num_classes or 0),
                                       int(batch_rows or 0), command))
    if output is not None:
        rep.write_json(output)
    return rep
