"""Load BPF objects through libbpf (libbpf.so.1) with ctypes.

This is the only module that calls libbpf. It opens a compiled CO-RE object,
loads it (libbpf relocates it against /sys/kernel/btf/vmlinux), attaches
programs, and gives typed access to maps and ring buffers. Every failure is a
BpfError naming the operation, the object and the errno text.

libbpf 1.x returns NULL and sets errno from constructors, and returns a
negative errno from the others (libbpf's "strict mode", the only mode since
1.0; see the libbpf 1.0 migration notes in libbpf's README).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from broker.errors import BpfError, hint_for

log = logging.getLogger(__name__)

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_OBJECT_DIR = Path(__file__).parent / "bpf"

_lib: ctypes.CDLL | None = None

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RING_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)


def _declare(lib: ctypes.CDLL) -> None:
    """Declare the argument and return types of the libbpf calls used here."""
    ptr, cint, uint, size = (
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_size_t,
    )
    signatures = {
        "bpf_object__open_file": (ptr, [ctypes.c_char_p, ptr]),
        "bpf_object__load": (cint, [ptr]),
        "bpf_object__close": (None, [ptr]),
        "bpf_object__find_program_by_name": (ptr, [ptr, ctypes.c_char_p]),
        "bpf_object__find_map_by_name": (ptr, [ptr, ctypes.c_char_p]),
        "bpf_program__fd": (cint, [ptr]),
        "bpf_program__attach": (ptr, [ptr]),
        "bpf_link__destroy": (cint, [ptr]),
        "bpf_map__fd": (cint, [ptr]),
        "bpf_map__key_size": (uint, [ptr]),
        "bpf_map__value_size": (uint, [ptr]),
        "bpf_map__type": (cint, [ptr]),
        "bpf_map__set_max_entries": (cint, [ptr, ctypes.c_uint32]),
        "bpf_map_update_elem": (cint, [cint, ptr, ptr, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (cint, [cint, ptr, ptr]),
        "bpf_map_delete_elem": (cint, [cint, ptr]),
        "bpf_map_get_next_key": (cint, [cint, ptr, ptr]),
        "libbpf_num_possible_cpus": (cint, []),
        "ring_buffer__new": (ptr, [cint, RING_BUFFER_SAMPLE_FN, ptr, ptr]),
        "ring_buffer__epoll_fd": (cint, [ptr]),
        "ring_buffer__consume": (cint, [ptr]),
        "ring_buffer__poll": (cint, [ptr, cint]),
        "ring_buffer__free": (None, [ptr]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    del size


def libbpf() -> ctypes.CDLL:
    """Return the loaded libbpf.so.1, loading it on first use."""
    global _lib
    if _lib is None:
        try:
            _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise BpfError(
                "load",
                "libbpf.so.1",
                errno.ENOENT,
                "install the libbpf1 package (Debian, Ubuntu)",
            ) from exc
        _declare(_lib)
    return _lib


def _check(ret: int, operation: str, target: str) -> int:
    """Raise BpfError for a negative libbpf return value; return it otherwise."""
    if ret >= 0:
        return ret
    err = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
    raise BpfError(operation, target, err, hint_for(err))


def _check_pointer(pointer: int | None, operation: str, target: str) -> int:
    if pointer:
        return pointer
    err = ctypes.get_errno() or errno.EINVAL
    raise BpfError(operation, target, err, hint_for(err))


def object_path(name: str) -> Path:
    """Return the path of a compiled BPF object shipped with the package."""
    override = os.environ.get("BROKER_BPF_DIR")
    directory = Path(override) if override else BPF_OBJECT_DIR
    path = directory / f"{name}.bpf.o"
    if not path.is_file():
        raise BpfError(
            "find",
            str(path),
            errno.ENOENT,
            "build the BPF objects with `make bpf` (needs clang and libbpf-dev)",
        )
    return path


class BpfMap:
    """A map of a loaded object, accessed by its file descriptor."""

    def __init__(self, pointer: int, name: str):
        lib = libbpf()
        self.name = name
        self.fd = lib.bpf_map__fd(pointer)
        self.key_size = lib.bpf_map__key_size(pointer)
        self.value_size = lib.bpf_map__value_size(pointer)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check_sizes(key, value)
        ret = libbpf().bpf_map_update_elem(self.fd, key, value, flags)
        _check(ret, "update map", self.name)

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        """Return the value stored under key, or None when the key is absent."""
        self._check_sizes(key)
        buffer = ctypes.create_string_buffer(value_size or self.value_size)
        ret = libbpf().bpf_map_lookup_elem(self.fd, key, buffer)
        if ret < 0 and (-ret == errno.ENOENT or ctypes.get_errno() == errno.ENOENT):
            return None
        _check(ret, "look up in map", self.name)
        return buffer.raw

    def delete(self, key: bytes) -> bool:
        """Delete key; return False when it was not there."""
        self._check_sizes(key)
        ret = libbpf().bpf_map_delete_elem(self.fd, key)
        if ret < 0 and (-ret == errno.ENOENT or ctypes.get_errno() == errno.ENOENT):
            return False
        _check(ret, "delete from map", self.name)
        return True

    def keys(self) -> Iterator[bytes]:
        """Yield every key; keys deleted meanwhile may be skipped, as the kernel does."""
        lib = libbpf()
        previous: bytes | None = None
        following = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = lib.bpf_map_get_next_key(self.fd, previous, following)
            if ret < 0:
                err = -ret if ret != -1 else ctypes.get_errno()
                if err == errno.ENOENT:
                    return
                _check(ret, "iterate map", self.name)
            previous = following.raw
            yield previous

    def _check_sizes(self, key: bytes, value: bytes | None = None) -> None:
        if len(key) != self.key_size:
            raise ValueError(
                f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}"
            )
        if value is not None and len(value) != self.value_size:
            raise ValueError(
                f"map {self.name}: value is {len(value)} bytes, expected {self.value_size}"
            )


def possible_cpus() -> int:
    """Return the number of possible CPUs, the slot count of per-CPU map values."""
    return _check(libbpf().libbpf_num_possible_cpus(), "count", "possible CPUs")


class RingBuffer:
    """A libbpf ring buffer consumer whose epoll fd plugs into an event loop."""

    def __init__(self, bpf_map: BpfMap, callback: Callable[[bytes], None]):
        def sample(_ctx: int, data: int, size: int) -> int:
            try:
                callback(ctypes.string_at(data, size))
            except Exception:  # noqa: BLE001 - never unwind through C frames
                log.exception("ring buffer callback of %s failed", bpf_map.name)
            return 0

        self._sample = RING_BUFFER_SAMPLE_FN(sample)  # keep a reference for C
        pointer = libbpf().ring_buffer__new(bpf_map.fd, self._sample, None, None)
        self._pointer = _check_pointer(pointer, "create ring buffer on", bpf_map.name)
        self.name = bpf_map.name

    def epoll_fd(self) -> int:
        return libbpf().ring_buffer__epoll_fd(self._pointer)

    def consume(self) -> int:
        """Run the callback for every record available now; return how many."""
        return _check(
            libbpf().ring_buffer__consume(self._pointer), "consume", self.name
        )

    def poll(self, timeout_ms: int) -> int:
        return _check(
            libbpf().ring_buffer__poll(self._pointer, timeout_ms), "poll", self.name
        )

    def free(self) -> None:
        if self._pointer:
            libbpf().ring_buffer__free(self._pointer)
            self._pointer = 0


class BpfObject:
    """A loaded BPF object file with its programs, maps and attach links."""

    def __init__(self, pointer: int, path: Path):
        self._pointer = pointer
        self.path = path
        self._links: list[tuple[str, int]] = []

    @classmethod
    def open(
        cls, path: Path | str, max_entries: dict[str, int] | None = None
    ) -> "BpfObject":
        """Open and load an object; max_entries resizes maps before the load."""
        path = Path(path)
        lib = libbpf()
        pointer = _check_pointer(
            lib.bpf_object__open_file(str(path).encode(), None),
            "open BPF object",
            str(path),
        )
        obj = cls(pointer, path)
        try:
            for name, entries in (max_entries or {}).items():
                map_pointer = obj._map_pointer(name)
                _check(
                    lib.bpf_map__set_max_entries(map_pointer, entries),
                    "resize map",
                    name,
                )
            _check(lib.bpf_object__load(pointer), "load BPF object", str(path))
        except BaseException:
            obj.close()
            raise
        log.debug("loaded BPF object %s", path)
        return obj

    def _map_pointer(self, name: str) -> int:
        pointer = libbpf().bpf_object__find_map_by_name(self._pointer, name.encode())
        if not pointer:
            raise BpfError("find map", f"{name} in {self.path}", errno.ENOENT)
        return pointer

    def _program_pointer(self, name: str) -> int:
        pointer = libbpf().bpf_object__find_program_by_name(
            self._pointer, name.encode()
        )
        if not pointer:
            raise BpfError("find program", f"{name} in {self.path}", errno.ENOENT)
        return pointer

    def map(self, name: str) -> BpfMap:
        return BpfMap(self._map_pointer(name), name)

    def program_fd(self, name: str) -> int:
        return _check(
            libbpf().bpf_program__fd(self._program_pointer(name)), "get fd of", name
        )

    def attach(self, name: str) -> None:
        """Attach a program where its SEC() name says (tracepoints, for example)."""
        link = libbpf().bpf_program__attach(self._program_pointer(name))
        self._links.append((name, _check_pointer(link, "attach program", name)))
        log.debug("attached BPF program %s", name)

    def detach_all(self) -> None:
        while self._links:
            name, link = self._links.pop()
            ret = libbpf().bpf_link__destroy(link)
            if ret < 0:
                log.warning(
                    "detaching BPF program %s failed: %s", name, os.strerror(-ret)
                )

    def close(self) -> None:
        """Detach every link and free the object; safe to call twice."""
        self.detach_all()
        if self._pointer:
            libbpf().bpf_object__close(self._pointer)
            self._pointer = 0

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
