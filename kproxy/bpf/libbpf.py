"""A small typed ctypes binding to libbpf.so.1 (written against libbpf 1.1.2).

Only what kproxy needs: open/load an object (with pinning and verifier logs), programs and maps of
that object, pinned objects by path, element and batch map operations, object info, tcx links and
BPF_PROG_TEST_RUN. libbpf 1.x returns negative errno from int functions and NULL + errno from
pointer functions; both become LibbpfError (an OSError) naming the operation, the object and the
reason. Every file descriptor this module creates is owned by exactly one Python object with a
close() method and a context manager.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os
import platform
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kproxy.libbpf")

# ---- constants (uapi linux/bpf.h; the TCX ones are missing from the 6.1 headers on this machine) ----
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_F_INNER_MAP = 1 << 12
PERCPU_MAP_TYPES = frozenset(
    {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}
)

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_XDP = 37  # attach type of an XDP link
BPF_TRACE_ITER = 28  # attach type of an iterator link (iter/udp...)
XDP_FLAGS_DRV_MODE = 1 << 2  # native XDP in the driver; without it the kernel may pick generic (skb) XDP
BPF_LINK_TYPE_TCX = 11
BPF_LINK_TYPE_XDP = 6

BPF_OBJ_NAME_LEN = 16
VERIFIER_LOG_SIZE = 4 * 1024 * 1024


class LibbpfError(OSError):
    """A libbpf or bpf() syscall call failed.

    errno/strerror as for OSError; `what` names the operation and object; `log` holds the verifier
    (or BTF) log when the kernel produced one, `libbpf_messages` the warnings libbpf printed meanwhile.
    """

    def __init__(self, err: int, what: str, log: str = "", libbpf_messages: list[str] | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.what = what
        self.log = log
        self.libbpf_messages = libbpf_messages or []

    def __str__(self) -> str:
        text = f"{self.what}: {self.strerror} (errno {self.errno})"
        if self.libbpf_messages:
            text += "\nlibbpf said:\n  " + "\n  ".join(m.rstrip() for m in self.libbpf_messages[-10:])
        if self.log:
            lines = self.log.rstrip("\n\0").splitlines()
            tail = lines[-40:]
            skipped = (
                f"  ... ({len(lines) - len(tail)} earlier lines in .log)\n" if len(lines) > len(tail) else ""
            )
            text += "\nverifier log (last lines):\n" + skipped + "\n".join("  " + ln for ln in tail)
        return text


# ---- C structures (copied from /usr/include/bpf/libbpf.h, bpf.h, linux/bpf.h) ----
class _OpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_stub_attach_prog_fd", ctypes.c_uint32),  # `__u32 :32` of the removed attach_prog_fd
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_void_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


class _LinkCreateOpts(ctypes.Structure):
    # struct bpf_link_create_opts up to flags; libbpf reads the fields past sz as zero
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _LinkUpdateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _LinkInfo(ctypes.Structure):
    # type, id, prog_id, then a union aligned to 8; for tcx (kernel >= 6.6) it starts with
    # {u32 ifindex; u32 attach_type}. 64 bytes covers every union member the kernel may fill.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("u32_0", ctypes.c_uint32),
        ("u32_1", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 48),
    ]


class _ProgInfo(ctypes.Structure):
    # Prefix of struct bpf_prog_info up to name; the kernel accepts a shorter info_len.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


# ---- loading the library ----
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_print_cb: Any = None
# libbpf warnings of the current thread, attached to the error of the call that caused them.
_messages = threading.local()

_c_int, _c_void_p, _c_char_p, _c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
_PROTOS: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_file": (_c_void_p, [_c_char_p, ctypes.POINTER(_OpenOpts)]),
    "bpf_object__load": (_c_int, [_c_void_p]),
    "bpf_object__close": (None, [_c_void_p]),
    "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
    "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
    "bpf_object__next_map": (_c_void_p, [_c_void_p, _c_void_p]),
    "bpf_object__next_program": (_c_void_p, [_c_void_p, _c_void_p]),
    "bpf_program__fd": (_c_int, [_c_void_p]),
    "bpf_program__name": (_c_char_p, [_c_void_p]),
    "bpf_map__fd": (_c_int, [_c_void_p]),
    "bpf_map__name": (_c_char_p, [_c_void_p]),
    "bpf_map__type": (_c_int, [_c_void_p]),
    "bpf_map__key_size": (ctypes.c_uint32, [_c_void_p]),
    "bpf_map__value_size": (ctypes.c_uint32, [_c_void_p]),
    "bpf_map__max_entries": (ctypes.c_uint32, [_c_void_p]),
    "bpf_map__map_flags": (ctypes.c_uint32, [_c_void_p]),
    "bpf_map__set_max_entries": (_c_int, [_c_void_p, ctypes.c_uint32]),
    "bpf_map__pin_path": (_c_char_p, [_c_void_p]),
    "bpf_map__is_pinned": (ctypes.c_bool, [_c_void_p]),
    "bpf_map__set_pin_path": (_c_int, [_c_void_p, _c_char_p]),
    "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
    "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
    "bpf_map_delete_elem": (_c_int, [_c_int, _c_void_p]),
    "bpf_map_get_next_key": (_c_int, [_c_int, _c_void_p, _c_void_p]),
    "bpf_map_update_batch": (
        _c_int,
        [_c_int, _c_void_p, _c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_BatchOpts)],
    ),
    "bpf_map_lookup_batch": (
        _c_int,
        [
            _c_int,
            _c_void_p,
            _c_void_p,
            _c_void_p,
            _c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(_BatchOpts),
        ],
    ),
    "bpf_map_delete_batch": (
        _c_int,
        [_c_int, _c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(_BatchOpts)],
    ),
    "bpf_obj_pin": (_c_int, [_c_int, _c_char_p]),
    "bpf_obj_get": (_c_int, [_c_char_p]),
    "bpf_obj_get_info_by_fd": (_c_int, [_c_int, _c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
    "bpf_link_create": (_c_int, [_c_int, _c_int, _c_int, _c_void_p]),
    "bpf_link_update": (_c_int, [_c_int, _c_int, ctypes.POINTER(_LinkUpdateOpts)]),
    "bpf_link_detach": (_c_int, [_c_int]),
    "bpf_iter_create": (_c_int, [_c_int]),
    "btf__load_vmlinux_btf": (_c_void_p, []),
    "btf__find_by_name_kind": (_c_int, [_c_void_p, _c_char_p, ctypes.c_uint32]),
    "btf__free": (None, [_c_void_p]),
    "bpf_prog_get_fd_by_id": (_c_int, [ctypes.c_uint32]),
    "bpf_map_get_fd_by_id": (_c_int, [ctypes.c_uint32]),
    "bpf_prog_load": (_c_int, [_c_int, _c_char_p, _c_char_p, _c_void_p, _c_size_t, _c_void_p]),
    "bpf_xdp_attach": (_c_int, [_c_int, _c_int, ctypes.c_uint32, _c_void_p]),
    "bpf_map_create": (
        _c_int,
        [
            _c_int,
            _c_char_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.POINTER(_MapCreateOpts),
        ],
    ),
    "bpf_prog_test_run_opts": (_c_int, [_c_int, ctypes.POINTER(_TestRunOpts)]),
    "libbpf_num_possible_cpus": (_c_int, []),
    "libbpf_set_print": (_c_void_p, [_c_void_p]),
}

_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def _on_print(level: int, fmt: bytes | None, va_list: int | None) -> int:
    try:
        pylevel = _LEVELS.get(level, logging.DEBUG)
        if pylevel < logging.WARNING and not log.isEnabledFor(pylevel):
            return 0
        text = (fmt or b"").decode(errors="replace")
        # va_list is an array type on x86-64, so the callback receives a pointer that vsnprintf accepts.
        if platform.machine() in ("x86_64", "AMD64") and va_list:
            buf = ctypes.create_string_buffer(4096)
            _libc.vsnprintf(buf, ctypes.c_size_t(len(buf)), fmt, ctypes.c_void_p(va_list))
            text = buf.value.decode(errors="replace")
        if pylevel >= logging.WARNING:
            msgs = getattr(_messages, "items", None)
            if msgs is not None:
                msgs.append(text)
        log.log(pylevel, "%s", text.rstrip())
    except Exception:  # a callback must never raise into C
        pass
    return 0


def lib() -> ctypes.CDLL:
    """The loaded libbpf.so.1 with argument types declared and printing routed to logging."""
    global _lib, _print_cb
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            name = "libbpf.so.1"
            try:
                handle = ctypes.CDLL(name, use_errno=True)
            except OSError as exc:
                found = ctypes.util.find_library("bpf")
                if not found:
                    raise OSError(
                        f"cannot load {name}: {exc}; install libbpf1 (apt-get install libbpf1)"
                    ) from exc
                handle = ctypes.CDLL(found, use_errno=True)
            for fname, (restype, argtypes) in _PROTOS.items():
                fn = getattr(handle, fname)
                fn.restype = restype
                fn.argtypes = argtypes
            _libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
            _libc.vsnprintf.restype = ctypes.c_int
            _print_cb = _PRINT_FN(_on_print)
            handle.libbpf_set_print(ctypes.cast(_print_cb, ctypes.c_void_p))
            _lib = handle
    return _lib


class _Capture:
    """Collects libbpf warnings printed by this thread during one call."""

    def __enter__(self) -> list[str]:
        self.prev = getattr(_messages, "items", None)
        _messages.items = collections.deque(maxlen=50)
        return _messages.items  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        _messages.items = self.prev


def _check(ret: int, what: str, messages: Any = None) -> int:
    if ret < 0:
        err = -ret
        raise LibbpfError(err, what, libbpf_messages=list(messages or []))
    return ret


def _ptr_errno() -> int:
    return ctypes.get_errno() or 22


def _buf(x: Any) -> Any:
    """Something a void* argument accepts: bytes, a ctypes array, or a reference to a ctypes value."""
    if x is None or isinstance(x, bytes | ctypes.Array):
        return x
    if isinstance(x, ctypes.Structure | ctypes.Union | ctypes._SimpleCData):
        return ctypes.byref(x)
    if isinstance(x, bytearray | memoryview):
        return (ctypes.c_char * len(x)).from_buffer(x)
    raise TypeError(f"cannot pass {type(x).__name__} as a buffer")


def _size(x: Any) -> int:
    if isinstance(x, bytes | bytearray):
        return len(x)
    if isinstance(x, memoryview):
        return x.nbytes
    return ctypes.sizeof(x)


def num_possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


# ---- file descriptors ----
class Fd:
    """An owned file descriptor of a BPF object; closed once, by close() or the context manager."""

    def __init__(self, fd: int, what: str) -> None:
        self._fd = fd
        self.what = what

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.what} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def pin(self, path: str) -> None:
        obj_pin(self.fd, path)


def obj_get(path: str) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"pin fd {fd} at {path}")


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    ifindex: int  # tcx and XDP links only; 0 once the interface is gone
    attach_type: int  # tcx and XDP links only


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    tag: str


def _info(fd: int, struct: Any, what: str) -> Any:
    info = struct()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), f"get info of {what}")
    return info


def prog_by_id(prog_id: int) -> Fd:
    """An owned fd of the loaded program with this id."""
    return Fd(
        _check(lib().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}"), f"program {prog_id}"
    )


def map_info(fd: int, what: str = "map") -> MapInfo:
    i = _info(fd, _MapInfo, what)
    return MapInfo(
        i.type, i.id, i.key_size, i.value_size, i.max_entries, i.map_flags, i.name.decode(errors="replace")
    )


def link_info(fd: int, what: str = "link") -> LinkInfo:
    i = _info(fd, _LinkInfo, what)
    if i.type == BPF_LINK_TYPE_TCX:
        return LinkInfo(i.type, i.id, i.prog_id, i.u32_0, i.u32_1)
    if i.type == BPF_LINK_TYPE_XDP:  # its union member is {u32 ifindex}
        return LinkInfo(i.type, i.id, i.prog_id, i.u32_0, BPF_XDP)
    return LinkInfo(i.type, i.id, i.prog_id, 0, 0)


def prog_info(fd: int, what: str = "program") -> ProgInfo:
    i = _info(fd, _ProgInfo, what)
    return ProgInfo(i.type, i.id, i.name.decode(errors="replace"), bytes(i.tag).hex())


# ---- maps ----
class Map:
    """A BPF map by fd: element and batch operations on raw bytes or ctypes values of the right size.

    Maps of a BpfObject borrow the object's fd (owned=False); Map.open_pinned() owns its fd.
    """

    def __init__(
        self, fd: int, name: str, map_type: int, key_size: int, value_size: int, max_entries: int, owned: bool
    ) -> None:
        self._fd = fd
        self.name = name
        self.type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.owned = owned
        # Per-CPU maps transfer value_size rounded up to 8, once per possible CPU.
        self.ncpus = num_possible_cpus() if map_type in PERCPU_MAP_TYPES else 1
        self.value_stride = (value_size + 7) // 8 * 8 if map_type in PERCPU_MAP_TYPES else value_size
        self.user_value_size = self.value_stride * self.ncpus

    @classmethod
    def open_pinned(cls, path: str) -> Map:
        fd = obj_get(path)
        try:
            info = map_info(fd, f"pinned map {path}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, info.name, info.type, info.key_size, info.value_size, info.max_entries, owned=True)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"map {self.name} is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0 and self.owned:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def info(self) -> MapInfo:
        return map_info(self.fd, f"map {self.name}")

    def pin(self, path: str) -> None:
        obj_pin(self.fd, path)

    def _check_key(self, key: Any) -> None:
        if _size(key) != self.key_size:
            raise ValueError(
                f"map {self.name}: key is {_size(key)} bytes, the map's keys are {self.key_size}"
            )

    def _check_value(self, value: Any) -> None:
        if _size(value) != self.user_value_size:
            raise ValueError(
                f"map {self.name}: value is {_size(value)} bytes, the map needs {self.user_value_size}"
            )

    def lookup(self, key: Any) -> bytes | None:
        self._check_key(key)
        out = ctypes.create_string_buffer(self.user_value_size)
        ret = lib().bpf_map_lookup_elem(self.fd, _buf(key), out)
        if ret == -2:  # ENOENT
            return None
        _check(ret, f"lookup in map {self.name}")
        return out.raw

    def lookup_into(self, key: Any, out: Any) -> bool:
        """Look key up into the ctypes value `out`; False when absent."""
        self._check_key(key)
        self._check_value(out)
        ret = lib().bpf_map_lookup_elem(self.fd, _buf(key), _buf(out))
        if ret == -2:
            return False
        _check(ret, f"lookup in map {self.name}")
        return True

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        self._check_key(key)
        self._check_value(value)
        _check(lib().bpf_map_update_elem(self.fd, _buf(key), _buf(value), flags), f"update map {self.name}")

    def delete(self, key: Any) -> bool:
        """Delete key; False if it was absent."""
        self._check_key(key)
        ret = lib().bpf_map_delete_elem(self.fd, _buf(key))
        if ret == -2:
            return False
        _check(ret, f"delete from map {self.name}")
        return True

    def get_next_key(self, key: Any | None) -> bytes | None:
        """The key after `key` (the first key for None); None at the end."""
        if key is not None:
            self._check_key(key)
        out = ctypes.create_string_buffer(self.key_size)
        ret = lib().bpf_map_get_next_key(self.fd, _buf(key), out)
        if ret == -2:
            return None
        _check(ret, f"iterate map {self.name}")
        return out.raw

    def iter_keys(self) -> Iterator[bytes]:
        """All keys by get_next_key. A key deleted meanwhile restarts the walk (kernel semantics)."""
        key = self.get_next_key(None)
        while key is not None:
            yield key
            key = self.get_next_key(key)

    def update_batch(self, keys: Any, values: Any, count: int, flags: int = BPF_ANY) -> int:
        """Write `count` entries from contiguous key and value buffers; returns how many were written.

        On error the LibbpfError carries `.done` = entries written before the failure.
        """
        if _size(keys) < count * self.key_size or _size(values) < count * self.user_value_size:
            raise ValueError(f"map {self.name}: batch buffers are smaller than {count} entries")
        n = ctypes.c_uint32(count)
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), flags, 0)
        ret = lib().bpf_map_update_batch(
            self.fd, _buf(keys), _buf(values), ctypes.byref(n), ctypes.byref(opts)
        )
        if ret < 0:
            err = LibbpfError(-ret, f"batch update of {count} entries in map {self.name}")
            err.done = n.value  # type: ignore[attr-defined]
            raise err
        return n.value

    def delete_batch(self, keys: Any, count: int) -> int:
        """Delete `count` keys; stops at the first absent key. Returns how many were deleted.

        Raises LibbpfError (with `.done`) for errors other than an absent key.
        """
        if _size(keys) < count * self.key_size:
            raise ValueError(f"map {self.name}: batch key buffer is smaller than {count} keys")
        n = ctypes.c_uint32(count)
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        ret = lib().bpf_map_delete_batch(self.fd, _buf(keys), ctypes.byref(n), ctypes.byref(opts))
        if ret == -2:
            return n.value
        if ret < 0:
            err = LibbpfError(-ret, f"batch delete of {count} keys from map {self.name}")
            err.done = n.value  # type: ignore[attr-defined]
            raise err
        return n.value

    def lookup_batch(self, chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """All entries, `chunk` at a time, as (key bytes, value bytes). Raises LibbpfError(EINVAL or
        EOPNOTSUPP) before yielding anything if the map type has no batch support."""
        chunk = max(1, min(chunk, self.max_entries or 1))
        token_in = ctypes.create_string_buffer(max(self.key_size, 8))
        token_out = ctypes.create_string_buffer(max(self.key_size, 8))
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        first = True
        while True:
            keys = ctypes.create_string_buffer(chunk * self.key_size)
            values = ctypes.create_string_buffer(chunk * self.user_value_size)
            n = ctypes.c_uint32(chunk)
            ret = lib().bpf_map_lookup_batch(
                self.fd,
                None if first else token_in,
                token_out,
                keys,
                values,
                ctypes.byref(n),
                ctypes.byref(opts),
            )
            if ret == -28 and n.value == 0:  # ENOSPC: one hash bucket holds more than `chunk` entries
                chunk *= 2
                continue
            if ret < 0 and ret != -2:
                _check(ret, f"batch lookup in map {self.name}")
            raw_k, raw_v = keys.raw, values.raw
            ks, vs = self.key_size, self.user_value_size
            for i in range(n.value):
                yield raw_k[i * ks : (i + 1) * ks], raw_v[i * vs : (i + 1) * vs]
            if ret == -2:  # ENOENT: the walk is complete
                return
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False


def map_create(
    map_type: int, name: str, key_size: int, value_size: int, max_entries: int, map_flags: int = 0
) -> Map:
    """A new map, not pinned: it lives while its fd (the returned Map owns it) or a reference to it (an
    outer map's entry) does."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=map_flags)
    with _Capture() as messages:
        fd = lib().bpf_map_create(
            map_type, name.encode()[:15], key_size, value_size, max_entries, ctypes.byref(opts)
        )
    _check(fd, f"create map {name} ({max_entries} entries of {value_size} bytes)", messages)
    return Map(fd, name, map_type, key_size, value_size, max_entries, owned=True)


def map_by_id(map_id: int) -> Map:
    """The map of id MAP_ID (an outer map's entry, as userspace reads it), by a new fd the Map owns."""
    fd = _check(lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")
    try:
        info = map_info(fd, f"map id {map_id}")
    except BaseException:
        os.close(fd)
        raise
    return Map(fd, info.name, info.type, info.key_size, info.value_size, info.max_entries, owned=True)


BPF_PROG_TYPE_XDP = 6
XDP_PASS = 2
# r0 = XDP_PASS; exit: the whole of an XDP program that lets every frame through
_XDP_PASS_INSNS = (
    bytes.fromhex("b7000000") + XDP_PASS.to_bytes(4, "little") + bytes.fromhex("9500000000000000")
)


def xdp_pass_everywhere(ifindex: int) -> None:
    """Attach a program that passes every frame as native XDP on interface IFINDEX of the calling
    thread's namespace (netlink, no link: it stays until the interface goes). A veth wakes its receive
    side for the frames its peer sends with XDP_TX or XDP_REDIRECT only when it runs an XDP program
    itself (the lab's LAN ports, kproxy.lab)."""
    with _Capture() as messages:
        fd = lib().bpf_prog_load(
            BPF_PROG_TYPE_XDP, b"kp_xdp_pass", b"GPL", _XDP_PASS_INSNS, len(_XDP_PASS_INSNS) // 8, None
        )
    _check(fd, "load an XDP_PASS program", messages)
    try:
        _check(
            lib().bpf_xdp_attach(ifindex, fd, XDP_FLAGS_DRV_MODE, None), f"attach XDP to ifindex {ifindex}"
        )
    finally:
        os.close(fd)


# ---- programs and objects ----
@dataclass(frozen=True)
class Program:
    """A loaded program of a BpfObject; the fd belongs to the object (valid until it is closed)."""

    name: str
    fd: int

    def info(self) -> ProgInfo:
        return prog_info(self.fd, f"program {self.name}")


class _LogBuffer:
    """The verifier log buffer libbpf writes into when a load fails: an anonymous mapping, so its
    pages cost no memory until the kernel writes to them (a zero-filled ctypes buffer kept 4 MB
    resident in every agent for the life of the object)."""

    def __init__(self, size: int) -> None:
        self._mm = mmap.mmap(-1, size)
        self._view = (ctypes.c_char * size).from_buffer(self._mm)
        self.address = ctypes.addressof(self._view)

    def text(self) -> str:
        end = self._mm.find(b"\0")
        return self._mm[: end if end >= 0 else len(self._mm)].decode(errors="replace")


class BpfObject:
    """An ELF BPF object opened with libbpf: open() -> set sizes -> load() -> programs and maps.

    With pin_root_path, maps declared LIBBPF_PIN_BY_NAME are pinned there (existing pins re-used);
    without it no map is pinned, so each loaded object has fresh private maps (for test runs).
    """

    def __init__(self, ptr: int, path: str, log_buf: Any, pin_root_path: str | None) -> None:
        self._ptr: int | None = ptr
        self.path = path
        self.pin_root_path = pin_root_path
        self._log_buf = log_buf  # libbpf keeps a pointer to it until close
        self.loaded = False

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        pin_root_path: str | None = None,
        map_sizes: dict[str, int] | None = None,
        log_size: int = VERIFIER_LOG_SIZE,
    ) -> BpfObject:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(2, f"BPF object {path} does not exist (build it with `make bpf`)", path)
        log_buf = _LogBuffer(log_size) if log_size else None
        opts = _OpenOpts()
        opts.sz = ctypes.sizeof(_OpenOpts)
        keep = pin_root_path.encode() if pin_root_path else None
        opts.pin_root_path = keep
        if log_buf is not None:
            opts.kernel_log_buf = log_buf.address
            opts.kernel_log_size = log_size
        with _Capture() as msgs:
            ptr = lib().bpf_object__open_file(os.fsencode(path), ctypes.byref(opts))
            if not ptr:
                raise LibbpfError(_ptr_errno(), f"open BPF object {path}", libbpf_messages=list(msgs))
        obj = cls(ptr, path, log_buf, pin_root_path)
        try:
            if pin_root_path is None:
                # No pin root: every map is private to this object (libbpf would pin under /sys/fs/bpf).
                for name in obj.map_names():
                    _check(lib().bpf_map__set_pin_path(obj._map_ptr(name), None), f"unpin map {name}")
            for name, size in (map_sizes or {}).items():
                obj.set_max_entries(name, size)
        except BaseException:
            obj.close()
            raise
        return obj

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._ptr

    def _map_ptr(self, name: str) -> int:
        p = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not p:
            raise KeyError(f"BPF object {self.path} has no map {name!r}; it has {self.map_names()}")
        return int(p)

    def map_names(self) -> list[str]:
        names = []
        p = lib().bpf_object__next_map(self.ptr, None)
        while p:
            names.append(lib().bpf_map__name(p).decode())
            p = lib().bpf_object__next_map(self.ptr, p)
        return names

    def program_names(self) -> list[str]:
        names = []
        p = lib().bpf_object__next_program(self.ptr, None)
        while p:
            names.append(lib().bpf_program__name(p).decode())
            p = lib().bpf_object__next_program(self.ptr, p)
        return names

    def set_max_entries(self, name: str, size: int) -> None:
        if self.loaded:
            raise ValueError(f"map {name}: max_entries can only be set before load()")
        _check(
            lib().bpf_map__set_max_entries(self._map_ptr(name), size), f"set max_entries={size} of map {name}"
        )

    def map_params(self, name: str) -> MapInfo:
        """Type, sizes and flags as the object will create the map (id 0: not created yet)."""
        p = self._map_ptr(name)
        lb = lib()
        return MapInfo(
            lb.bpf_map__type(p),
            0,
            lb.bpf_map__key_size(p),
            lb.bpf_map__value_size(p),
            lb.bpf_map__max_entries(p),
            lb.bpf_map__map_flags(p),
            name,
        )

    def pin_path(self, name: str) -> str | None:
        v = lib().bpf_map__pin_path(self._map_ptr(name))
        return v.decode() if v else None

    def load(self) -> None:
        if self.loaded:
            return
        with _Capture() as msgs:
            ret = lib().bpf_object__load(self.ptr)
            if ret < 0:
                text = ""
                if self._log_buf is not None:
                    text = self._log_buf.text()
                raise LibbpfError(-ret, f"load BPF object {self.path}", log=text, libbpf_messages=list(msgs))
        self.loaded = True

    def program(self, name: str) -> Program:
        p = lib().bpf_object__find_program_by_name(self.ptr, name.encode())
        if not p:
            raise KeyError(f"BPF object {self.path} has no program {name!r}; it has {self.program_names()}")
        fd = lib().bpf_program__fd(p)
        if fd < 0:
            raise LibbpfError(-fd, f"program {name} of {self.path} has no fd (is the object loaded?)")
        return Program(name, fd)

    def map(self, name: str) -> Map:
        p = self._map_ptr(name)
        lb = lib()
        fd = lb.bpf_map__fd(p)
        if fd < 0:
            raise LibbpfError(-fd, f"map {name} of {self.path} has no fd (is the object loaded?)")
        return Map(
            fd,
            name,
            lb.bpf_map__type(p),
            lb.bpf_map__key_size(p),
            lb.bpf_map__value_size(p),
            lb.bpf_map__max_entries(p),
            owned=False,
        )

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            lib().bpf_object__close(ptr)

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# ---- links ----
def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str = "", flags: int = 0) -> Fd:
    """A BPF link of the program to a target (an ifindex for tcx and XDP); FLAGS: link_create.flags
    (XDP_FLAGS_DRV_MODE...)."""
    opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), flags) if flags else None
    ret = lib().bpf_link_create(prog_fd, target_fd, attach_type, ctypes.byref(opts) if opts else None)
    _check(ret, f"create link {what or f'type {attach_type} on target {target_fd}'}")
    return Fd(ret, f"link {what}")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int = 0, what: str = "") -> None:
    opts = _LinkUpdateOpts(
        ctypes.sizeof(_LinkUpdateOpts), 4 if old_prog_fd else 0, old_prog_fd
    )  # BPF_F_REPLACE
    _check(lib().bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)), f"update link {what or link_fd}")


def link_detach(link_fd: int, what: str = "") -> None:
    _check(lib().bpf_link_detach(link_fd), f"detach link {what or link_fd}")


def iter_create(link_fd: int, what: str = "") -> Fd:
    """A new iterator of an iterator link (BPF_TRACE_ITER): read it to the end to run its program. A
    network iterator (iter/udp, iter/tcp) walks the network namespace of the thread calling this."""
    fd = _check(lib().bpf_iter_create(link_fd), f"create iterator {what or link_fd}")
    return Fd(fd, f"iterator {what}")


BTF_KIND_STRUCT = 4
BTF_KIND_FUNC = 12


def vmlinux_btf_has(name: str, kind: int) -> bool | None:
    """Whether the running kernel's BTF has a type NAME of KIND (BTF_KIND_FUNC: a kfunc or kernel
    function); None when the kernel's BTF cannot be read."""
    lb = lib()
    btf = lb.btf__load_vmlinux_btf()
    if not btf:  # libbpf 1.x: NULL and errno on failure
        return None
    try:
        return bool(lb.btf__find_by_name_kind(btf, name.encode(), kind) > 0)
    finally:
        lb.btf__free(btf)


# ---- test runs ----
@dataclass(frozen=True)
class TestRun:
    __test__ = False  # not a pytest class

    retval: int
    data_out: bytes
    ctx_out: bytes | None
    duration_ns: int


def prog_test_run(
    prog_fd: int,
    data: bytes,
    ctx: bytes | None = None,
    repeat: int = 1,
    data_out_size: int | None = None,
    flags: int = 0,
) -> TestRun:
    """Run a program on `data` (and optional __sk_buff `ctx`) with BPF_PROG_TEST_RUN; `flags`: BPF_F_TEST_*
    (TEST_SKB_CHECKSUM_COMPLETE: the skb is CHECKSUM_COMPLETE and the kernel checks skb->csum after)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    out_size = data_out_size if data_out_size is not None else len(data) + 4096
    data_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    opts.flags = flags
    ctx_in = ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        ctx_out = ctypes.create_string_buffer(len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.cast(ctx_out, ctypes.c_void_p)
        opts.ctx_size_out = len(ctx)
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), f"test run of program fd {prog_fd}")
    return TestRun(
        retval=opts.retval,
        data_out=data_out.raw[: opts.data_size_out],
        ctx_out=ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else None,
        duration_ns=opts.duration,
    )


BPF_F_TEST_SKB_CHECKSUM_COMPLETE = 1 << 2

# ---- cgroup links (socket-level load balancing, kproxy/bpf/socklb.py) ----
BPF_LINK_TYPE_CGROUP = 3


@dataclass(frozen=True)
class CgroupLinkInfo:
    id: int
    prog_id: int
    cgroup_id: int  # 0 once the cgroup is gone: the link then runs nowhere
    attach_type: int


def cgroup_link_info(fd: int, what: str = "link") -> CgroupLinkInfo:
    """Link info of a cgroup link: its union member is {u64 cgroup_id; u32 attach_type}."""
    i = _info(fd, _LinkInfo, what)
    if i.type != BPF_LINK_TYPE_CGROUP:
        raise LibbpfError(22, f"{what} is a link of type {i.type}, not a cgroup link")
    raw = bytes(i)[_LinkInfo.u32_0.offset :]
    cgroup_id = int.from_bytes(raw[0:8], sys.byteorder)
    attach_type = int.from_bytes(raw[8:12], sys.byteorder)
    return CgroupLinkInfo(i.id, i.prog_id, cgroup_id, attach_type)
