# cython: language_level=3
# distutils: language = c++
"""The ketama lookup: md5 of a key and a binary search over the ring's points, in C.

Pure Python spends about 2 microseconds per lookup (hashlib call, int
conversion, bisect); the client looks up every request, and bounded-load
routing walks several points, so the hash and the search run here without
the GIL and without Python objects.
"""

from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libcpp.vector cimport vector

cdef extern from "md5.h" nogil:
    void ringlm_md5(const uint8_t* data, size_t length, uint8_t digest[16])


cdef inline uint32_t digest_word(const uint8_t* digest, int word) noexcept nogil:
    return (<uint32_t>digest[4 * word] | (<uint32_t>digest[4 * word + 1] << 8)
            | (<uint32_t>digest[4 * word + 2] << 16) | (<uint32_t>digest[4 * word + 3] << 24))


def md5_digest(bytes data) -> bytes:
    """MD5 of data (for tests against hashlib)."""
    cdef uint8_t digest[16]
    ringlm_md5(<const uint8_t*>data, len(data), digest)
    return (<char*>digest)[:16]


def ketama_points(str name, int groups) -> list:
    """The 4 * groups points of a node: md5(f"{name}-{i}") read as four little-endian words."""
    cdef uint8_t digest[16]
    cdef Py_ssize_t n
    points = []
    for group in range(groups):
        label = f"{name}-{group}"
        ringlm_md5(<const uint8_t*>PyUnicode_AsUTF8AndSize(label, &n), n, digest)
        points += [digest_word(digest, w) for w in range(4)]
    return points


cdef inline uint32_t hash_key(str key) except? 0:
    cdef Py_ssize_t n
    cdef const char* data = PyUnicode_AsUTF8AndSize(key, &n)
    cdef uint8_t digest[16]
    ringlm_md5(<const uint8_t*>data, n, digest)
    return digest_word(digest, 0)


def key_hash(str key) -> int:
    """A key's point on the circle: md5's first four bytes, little-endian."""
    return hash_key(key)


cdef class Continuum:
    """Sorted points, the index of the node owning each, and the node names."""

    cdef vector[uint32_t] points
    cdef vector[int32_t] owners
    cdef list names

    def __init__(self, list points, list owners, list names):
        self.points = points
        self.owners = owners
        self.names = names

    def __len__(self) -> int:
        return self.points.size()

    cdef Py_ssize_t start(self, str key) except -1:
        """Index of the first point after the key's hash (as bisect.bisect_right), wrapping to 0."""
        cdef uint32_t h = hash_key(key)
        cdef Py_ssize_t low = 0, high = self.points.size(), middle
        if high == 0:
            raise LookupError("the ring has no nodes")
        while low < high:
            middle = (low + high) >> 1
            if self.points[middle] <= h:
                low = middle + 1
            else:
                high = middle
        return 0 if low == <Py_ssize_t>self.points.size() else low

    cpdef str node_for(self, str key):
        """The key's home node."""
        return self.names[self.owners[self.start(key)]]

    cpdef list nodes_for(self, str key):
        """Every node once, in the order the key meets their points clockwise."""
        cdef Py_ssize_t start = self.start(key), count = self.points.size(), offset
        cdef Py_ssize_t found = 0, wanted = len(self.names)
        cdef vector[char] seen = vector[char](wanted, 0)
        cdef int32_t owner
        order = []
        for offset in range(count):
            owner = self.owners[(start + offset) % count]
            if not seen[owner]:
                seen[owner] = 1
                order.append(self.names[owner])
                found += 1
                if found == wanted:
                    break
        return order
