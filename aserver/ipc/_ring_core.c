/* The per-record steps of a ring, in C: RingWriter.try_write, RingReader.read_batch and
 * RingSender.send (SenderCore: write or queue, and see that the record gets published).
 *
 * ring_core.py is the same code in Python (the fallback when no C compiler was there at
 * install time) and the description of what these do; the layout is in ring.py. Each
 * side's positions live in this object, as attributes ring.py reads and sets, and the
 * per-batch steps here publish them (release stores; a full fence where a side announces
 * itself before it looks at the other). ring.py's own stores (at attach, skip, discard)
 * are plain, so, like the pure-Python ring, this relies on x86's ordering (stores are
 * not reordered with older stores, loads not with older loads).
 * Unlike mmap slicing, nothing here is bounds-checked by Python: every offset is checked
 * against the capacity, and the capacity against the mapping, before it is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "records are little-endian and copied as native words; use ring_core.py on this host"
#endif

/* What aserver/native.py expects: raise it whenever a call's signature or meaning
   changes, so a stale build is not used. */
#define RING_CORE_ABI 8

#define DATA_OFFSET 384
#define HEADER_SIZE 16
#define KIND_WRAP 0xFFFFFFFFu
#define WORD_WRITE_POS 8
#define WORD_READ_POS 16
#define WORD_READER_SLEEPING 24
#define WORD_WRITER_WAITING 32
#define WORD_RECORDS_READ 40

typedef struct {
    uint32_t length;
    uint32_t kind;
    uint64_t conn_id;
} RecordHeader;

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* the whole segment; released by detach() */
    PyObject *segment; /* a read-only memoryview of it: in-place payloads are slices of it */
    char *base;
    unsigned long long capacity;
    unsigned long long position; /* _write or _read: this side's own position */
    unsigned long long other;    /* writer: _read, the consumer's position as last seen */
    unsigned long long unpublished;
    unsigned long long unpublished_weight; /* writer: what the records since the last publish weigh */
    unsigned long long records; /* writer: records_written; reader: _records_read */
    unsigned long long rewind_at;
    Py_ssize_t max_payload;
    long long reserved;      /* writer: payload bytes reserve() found room for; -1: none */
    unsigned long long skip; /* writer: the tail that reservation leaves (a WRAP), or 0 */
    /* writer, after refer_to(): list parts that lie in this other segment (the request
       ring, for a reply ring) and are at least ref_min bytes go as references. Only the
       addresses are kept, to compare with: the other segment is never read here. */
    uintptr_t ref_base, ref_end; /* its start and end; 0, 0: refer to nothing */
    Py_ssize_t ref_min;
    unsigned long ref_kind; /* the low byte of such a record's kind */
    int wake_fd;  /* the data pipe: writer, write end (pokes); reader, read end (drained) */
    int space_fd; /* the space pipe: writer, read end (drained); reader, write end (pokes) */
} Core;

/* A reference entry of a record: see records.py, PACKETS_BY_REF and REF_ENTRY. */
typedef struct {
    uint32_t inline_length;
    uint32_t ref_length;
    uint64_t ref_offset;
} RefEntry;

static uint64_t load_word(const Core *self, int index) {
    return __atomic_load_n((uint64_t *)self->base + index, __ATOMIC_ACQUIRE);
}

static void store_word(const Core *self, int index, uint64_t value) {
    __atomic_store_n((uint64_t *)self->base + index, value, __ATOMIC_RELEASE);
}

/* Store one of our words (a position or a flag), then read one of the other side's: the
   full fence keeps the load from passing the store (each side announces itself before it
   looks at the other, so no wakeup is lost). ring_core.fence is the pure-Python one. */
static uint64_t announce_then_load(const Core *self, int word, uint64_t value, int index) {
    store_word(self, word, value);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load_word(self, index);
}

/* One byte down a wake pipe (ring_core.poke): a full pipe already holds a wakeup. */
static int poke(int fd) {
    while (write(fd, "", 1) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

/* Empty a wake pipe's read end (ring_core.drain_pipe). */
static int drain(int fd) {
    char sink[4096];
    for (;;) {
        ssize_t got = read(fd, sink, sizeof sink);
        if (got == (ssize_t)sizeof sink) continue;
        if (got >= 0 || errno == EAGAIN || errno == EWOULDBLOCK) return 0;
        if (errno != EINTR) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
}

/* __init__(shm): attach to a SharedMemory's buffer. */
static int core_init(Core *self, PyObject *args, PyObject *Py_UNUSED(kwds)) {
    PyObject *shm;
    if (!PyArg_ParseTuple(args, "O", &shm)) return -1;
    if (self->base != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ring core already attached");
        return -1;
    }
    PyObject *buffer = PyObject_GetAttrString(shm, "buf");
    if (buffer == NULL) return -1;
    int failed = PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0;
    if (!failed) {
        /* Slices of this keep the mapping's export alive, so a view kept past close()
           stays readable (close() then leaves the mapping to the process's exit). */
        Py_XSETREF(self->segment, PyObject_CallMethod(buffer, "toreadonly", NULL));
        if (self->segment == NULL) {
            PyBuffer_Release(&self->view);
            failed = 1;
        }
    }
    Py_DECREF(buffer);
    if (failed) return -1;
    if (self->view.len < DATA_OFFSET) {
        PyBuffer_Release(&self->view);
        Py_CLEAR(self->segment);
        PyErr_SetString(PyExc_ValueError, "segment smaller than a ring header");
        return -1;
    }
    self->base = self->view.buf;
    self->reserved = -1;
    self->wake_fd = self->space_fd = -1;
    self->capacity = load_word(self, 0);
    if (self->capacity == 0 || self->capacity > (unsigned long long)self->view.len - DATA_OFFSET) {
        PyBuffer_Release(&self->view);
        Py_CLEAR(self->segment);
        self->base = NULL;
        PyErr_SetString(PyExc_ValueError, "segment does not hold the capacity its header says");
        return -1;
    }
    /* A quarter of the ring (see ring_core.max_payload), and never past the u32 length field. */
    unsigned long long quarter = self->capacity / 4 - HEADER_SIZE;
    self->max_payload = (Py_ssize_t)(quarter < 0xFFFFFFFFull ? quarter : 0xFFFFFFFFull);
    return 0;
}

static PyObject *core_detach(Core *self, PyObject *Py_UNUSED(unused)) {
    if (self->base != NULL) {
        self->base = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->segment);
    Py_RETURN_NONE;
}

static void core_dealloc(Core *self) {
    if (self->base != NULL) PyBuffer_Release(&self->view);
    Py_CLEAR(self->segment);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int attached(const Core *self) {
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return 0;
    }
    return 1;
}

/* Room for a record of up to `length` payload bytes (at most max_payload): the payload's
   offset in the segment, or -1 when there is no room. Writes nothing; the room is ours
   until the next write (see ring_core.WriterCore.reserve). */
static long long reserve_room(Core *self, unsigned long long length) {
    self->reserved = -1;
    unsigned long long size = (HEADER_SIZE + length + 7) & ~7ull;
    unsigned long long capacity = self->capacity;
    unsigned long long write = self->position;
    unsigned long long offset = write % capacity;
    unsigned long long tail = capacity - offset;
    unsigned long long need = size;
    if (size > tail) {
        need = tail + size;
    } else if (offset >= self->rewind_at && size <= offset && load_word(self, WORD_READ_POS) == write) {
        self->other = write; /* everything was consumed: back to the (cache-warm) front */
        need = tail + size;
    }
    if (write - self->other > capacity || need > capacity - (write - self->other)) {
        self->other = load_word(self, WORD_READ_POS);
        if (write - self->other > capacity || need > capacity - (write - self->other)) return -1;
    }
    self->reserved = (long long)length;
    self->skip = need - size;
    return DATA_OFFSET + HEADER_SIZE + (long long)(self->skip ? 0 : offset);
}

/* Make the first `length` reserved payload bytes (already in place) a record. The caller
   checked length <= reserved. */
static void commit_record(Core *self, unsigned long long kind, unsigned long long conn_id, unsigned long long length,
                          unsigned long long weight) {
    self->reserved = -1;
    unsigned long long offset = self->position % self->capacity;
    if (self->skip) {
        if (self->skip >= HEADER_SIZE) {
            RecordHeader wrap = {0, KIND_WRAP, 0};
            memcpy(self->base + DATA_OFFSET + offset, &wrap, HEADER_SIZE);
        }
        offset = 0;
    }
    RecordHeader header = {(uint32_t)length, (uint32_t)kind, conn_id};
    memcpy(self->base + DATA_OFFSET + offset, &header, HEADER_SIZE);
    unsigned long long need = self->skip + ((HEADER_SIZE + length + 7) & ~7ull);
    self->position += need;
    self->unpublished += need; /* a skipped tail too: `unpublished` is ring space in use */
    self->unpublished_weight += weight;
    self->records += 1;
}

/* kind and conn_id of a record from Python ints; -1 with an exception set if unusable. */
static int record_ids(PyObject *kind_obj, PyObject *conn_obj, unsigned long long *kind, unsigned long long *conn_id) {
    *kind = PyLong_AsUnsignedLongLong(kind_obj);
    if (*kind == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (*kind > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_OverflowError, "record kind does not fit in 32 bits");
        return -1;
    }
    if (*kind == KIND_WRAP) {
        PyErr_SetString(PyExc_ValueError, "record kind 0xFFFFFFFF is the ring's wrap marker");
        return -1;
    }
    *conn_id = PyLong_AsUnsignedLongLong(conn_obj);
    if (*conn_id == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    return 0;
}

/* How a list part goes into a record: copied, as (the start of) a reference, or not at
   all, being part of a reference an earlier part starts. */
enum { INLINE, REFERENCE, FOLDED };
typedef struct {
    char how;
    uintptr_t at;       /* REFERENCE: where in the referred-to segment it starts */
    unsigned long long length; /* REFERENCE: its bytes, the parts folded into it included */
} Span;

/* The longest inline part compared with the ring bytes before a reference: a packet
   header (18 bytes). A body starts at least that far, plus the 16-byte record header,
   into its record, so a fold stays in the body's own record, which is not freed before
   the reply is sent; a longer one could reach a freed record the conn process reuses. */
#define FOLD_MAX 32

/* Plan a list's parts (see Span): a part of ref_min bytes or more in the referred-to
   segment is a reference; the inline part just before it joins it when its bytes are the
   ones just before it in that segment (an echo's header, equal to its request's); and a
   reference that starts where the one before it ends, nothing between, extends that one.
   A run of echoed requests thus goes as one reference to their own bytes. Returns the
   number of references; when there are any, sets *length to the record's payload size. */
static unsigned long long plan_references(const Core *self, const Py_buffer *parts, Py_ssize_t count, Span *plan,
                                          unsigned long long *length_out) {
    unsigned long long references = 0;
    unsigned long long inlined = 0, trailing = 0; /* inline bytes in all; since the last reference */
    Py_ssize_t open = -1;        /* the reference nothing was copied after yet, if any */
    Py_ssize_t inline_since = 0; /* inline parts since the last reference */
    uintptr_t first = self->ref_base + DATA_OFFSET; /* its records; not its header */
    for (Py_ssize_t i = 0; i < count; i++) {
        uintptr_t at = (uintptr_t)parts[i].buf;
        unsigned long long length = (unsigned long long)parts[i].len;
        if (!(parts[i].len >= self->ref_min && at >= first && at + length <= self->ref_end)) {
            plan[i].how = INLINE;
            inline_since++;
            inlined += length;
            trailing += length;
            continue;
        }
        /* inline_since: part i - 1 is inline (a part is folded only with the one after it) */
        if (inline_since && parts[i - 1].len <= FOLD_MAX &&
            (uintptr_t)parts[i - 1].len <= at - first &&
            memcmp(parts[i - 1].buf, (const void *)(at - (uintptr_t)parts[i - 1].len), parts[i - 1].len) == 0) {
            plan[i - 1].how = FOLDED;
            at -= (uintptr_t)parts[i - 1].len;
            length += (unsigned long long)parts[i - 1].len;
            inlined -= (unsigned long long)parts[i - 1].len;
            inline_since--;
        }
        if (open >= 0 && !inline_since && plan[open].at + plan[open].length == at &&
            plan[open].length + length <= 0xFFFFFFFFull) {
            plan[open].length += length;
            plan[i].how = FOLDED;
        } else {
            plan[i] = (Span){REFERENCE, at, length};
            open = i;
            references++;
        }
        inline_since = 0;
        trailing = 0;
    }
    /* Each reference is an entry; inline bytes after the last one make one more. */
    if (references) *length_out = inlined + (references + (trailing > 0)) * sizeof(RefEntry);
    return references;
}

/* try_write(kind, conn_id, payload) -> bool. payload: a buffer, or a list of buffers
   copied in one after another (what b"".join would make, without making it). */
#define STACK_PARTS 64 /* parts held on the stack; a longer list's are allocated */
static PyObject *writer_try_write(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "try_write(kind, conn_id, payload)");
        return NULL;
    }
    unsigned long long kind, conn_id;
    if (record_ids(args[0], args[1], &kind, &conn_id) < 0) return NULL;
    PyObject *source = args[2];
    Py_buffer stack_parts[STACK_PARTS];
    Span stack_plan[STACK_PARTS];
    Py_buffer *parts = stack_parts;
    Span *plan = stack_plan;
    Py_ssize_t count = 0;
    unsigned long long length = 0;
    PyObject *result = NULL;
    if (PyList_CheckExact(source)) {
        Py_ssize_t wanted = PyList_GET_SIZE(source);
        if (wanted > STACK_PARTS) {
            parts = PyMem_Malloc((size_t)wanted * (sizeof *parts + sizeof *plan));
            if (parts == NULL) return PyErr_NoMemory();
            plan = (Span *)(parts + wanted);
        }
        /* Bounded by the size we made room for, whatever a part's buffer export does to the list. */
        while (count < PyList_GET_SIZE(source) && count < wanted) {
            PyObject *item = PyList_GET_ITEM(source, count);
            Py_INCREF(item);
            int failed = PyObject_GetBuffer(item, &parts[count], PyBUF_C_CONTIGUOUS) < 0;
            Py_DECREF(item);
            if (failed) goto done;
            length += (unsigned long long)parts[count].len;
            count++;
        }
        if (count != PyList_GET_SIZE(source)) {
            PyErr_SetString(PyExc_RuntimeError, "record parts changed while being copied");
            goto done;
        }
    } else {
        if (PyObject_GetBuffer(source, &parts[0], PyBUF_C_CONTIGUOUS) < 0) goto done;
        count = 1;
        length = (unsigned long long)parts[0].len;
    }
    /* After GetBuffer: a __buffer__ method may have closed us. */
    if (!attached(self)) goto done;
    /* Parts that lie in the referred-to segment go as references (records.PACKETS_BY_REF). */
    unsigned long long entries = 0;
    if (self->ref_end && PyList_CheckExact(source)) entries = plan_references(self, parts, count, plan, &length);
    if (length > (unsigned long long)self->max_payload) {
        PyErr_Format(PyExc_ValueError, "record of %llu bytes exceeds ring limit %zd", length, self->max_payload);
        goto done;
    }
    long long at = reserve_room(self, length);
    if (at < 0) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    char *to = self->base + at;
    if (entries) {
        /* Each entry: its header, then the inline parts before the next reference. */
        RefEntry entry = {0, 0, 0};
        char *entry_at = to;
        to += sizeof(RefEntry);
        for (Py_ssize_t i = 0; i < count; i++) {
            if (plan[i].how == REFERENCE) {
                entry.ref_length = (uint32_t)plan[i].length;
                entry.ref_offset = (uint64_t)(plan[i].at - self->ref_base);
                memcpy(entry_at, &entry, sizeof(RefEntry));
                entry.inline_length = 0;
                entry_at = to;
                to += sizeof(RefEntry);
            } else if (plan[i].how == INLINE) {
                memcpy(to, parts[i].buf, parts[i].len);
                to += parts[i].len;
                entry.inline_length += (uint32_t)parts[i].len;
            }
        }
        if (entry.inline_length) {
            entry.ref_length = 0;
            entry.ref_offset = 0;
            memcpy(entry_at, &entry, sizeof(RefEntry));
        }
        kind = (kind & ~0xFFull) | self->ref_kind;
    } else {
        for (Py_ssize_t i = 0; i < count; i++) {
            memcpy(to, parts[i].buf, parts[i].len);
            to += parts[i].len;
        }
    }
    commit_record(self, kind, conn_id, length, 1);
    result = Py_True;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < count; i++) PyBuffer_Release(&parts[i]);
    if (parts != stack_parts) PyMem_Free(parts);
    return result;
}

/* released(position): see ring_core.WriterCore.released. */
static PyObject *writer_released(Core *self, PyObject *arg) {
    unsigned long long position = PyLong_AsUnsignedLongLong(arg);
    if (position == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (!attached(self)) return NULL;
    unsigned long long read = load_word(self, WORD_READ_POS);
    if (position < read || position > self->position) {
        return PyErr_Format(PyExc_ValueError, "release to %llu: the ring holds %llu to %llu", position, read,
                            self->position);
    }
    __atomic_store_n((uint64_t *)self->base + WORD_READ_POS, position, __ATOMIC_RELEASE);
    self->other = position;
    Py_RETURN_NONE;
}

/* refer_to(segment, kind, min_size): see ring_core.WriterCore.refer_to. */
static PyObject *writer_refer_to(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "refer_to(segment, kind, min_size)");
        return NULL;
    }
    unsigned long ref_kind = PyLong_AsUnsignedLong(args[1]);
    if (ref_kind == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    Py_ssize_t ref_min = PyLong_AsSsize_t(args[2]);
    if (ref_min == -1 && PyErr_Occurred()) return NULL;
    if (ref_kind >= 0xFF || ref_min < 1) { /* 0xFF: with every ack bit set, the kind would read as a WRAP */
        PyErr_SetString(PyExc_ValueError, "refer_to: kind must be below 0xFF and min_size positive");
        return NULL;
    }
    self->ref_base = self->ref_end = 0;
    if (args[0] != Py_None) {
        Py_buffer view;
        if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
        if (view.len > DATA_OFFSET) { /* its records can be referred to, not its header */
            self->ref_base = (uintptr_t)view.buf;
            self->ref_end = (uintptr_t)view.buf + (uintptr_t)view.len;
        }
        PyBuffer_Release(&view);
    }
    self->ref_kind = ref_kind;
    self->ref_min = ref_min;
    Py_RETURN_NONE;
}

/* reserve(length) -> int: see ring_core.WriterCore.reserve. */
static PyObject *writer_reserve(Core *self, PyObject *arg) {
    Py_ssize_t length = PyLong_AsSsize_t(arg);
    if (length == -1 && PyErr_Occurred()) return NULL;
    if (!attached(self)) return NULL;
    if (length < 0 || length > self->max_payload) {
        return PyErr_Format(PyExc_ValueError, "record of %zd bytes exceeds ring limit %zd", length, self->max_payload);
    }
    return PyLong_FromLongLong(reserve_room(self, (unsigned long long)length));
}

/* commit(kind, conn_id, length): see ring_core.WriterCore.commit. */
static int commit_checked(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "commit(kind, conn_id, length, weight=1)");
        return -1;
    }
    unsigned long long kind, conn_id;
    if (record_ids(args[0], args[1], &kind, &conn_id) < 0) return -1;
    Py_ssize_t length = PyLong_AsSsize_t(args[2]);
    if (length == -1 && PyErr_Occurred()) return -1;
    unsigned long long weight = nargs == 4 ? PyLong_AsUnsignedLongLong(args[3]) : 1;
    if (weight == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (!attached(self)) return -1;
    if (length < 0 || length > self->reserved) {
        PyErr_Format(PyExc_ValueError, "commit of %zd bytes: %lld were reserved", length,
                     self->reserved > 0 ? self->reserved : 0);
        return -1;
    }
    commit_record(self, kind, conn_id, (unsigned long long)length, weight);
    return 0;
}

static PyObject *writer_commit(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (commit_checked(self, args, nargs) < 0) return NULL;
    Py_RETURN_NONE;
}

/* read_batch(limit, in_place=False) -> [(kind, conn_id, payload), ...]: payloads are
   bytes, or with in_place read-only memoryviews of the ring itself. */
static PyObject *reader_read_batch(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "read_batch(limit, in_place=False)");
        return NULL;
    }
    if (!attached(self)) return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[0]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    int in_place = nargs == 2 ? PyObject_IsTrue(args[1]) : 0;
    if (in_place < 0) return NULL;
    PyObject *records = PyList_New(0);
    if (records == NULL) return NULL;
    unsigned long long write = load_word(self, WORD_WRITE_POS);
    unsigned long long read = self->position;
    unsigned long long capacity = self->capacity;
    Py_ssize_t count = 0;
    while (read < write && count < limit) {
        unsigned long long offset = read % capacity;
        unsigned long long tail = capacity - offset;
        if (tail < HEADER_SIZE) {
            read += tail;
            continue;
        }
        const char *at = self->base + DATA_OFFSET + offset;
        RecordHeader header;
        memcpy(&header, at, HEADER_SIZE);
        if (header.kind == KIND_WRAP) {
            read += tail;
            continue;
        }
        if (header.length > tail - HEADER_SIZE) {
            Py_DECREF(records);
            return PyErr_Format(PyExc_RuntimeError, "corrupt ring record at offset %llu", offset);
        }
        PyObject *record = PyTuple_New(3);
        if (record == NULL) goto fail;
        PyTuple_SET_ITEM(record, 0, PyLong_FromUnsignedLong(header.kind));
        PyTuple_SET_ITEM(record, 1, PyLong_FromUnsignedLongLong(header.conn_id));
        Py_ssize_t start = (Py_ssize_t)(DATA_OFFSET + offset + HEADER_SIZE);
        PyTuple_SET_ITEM(record, 2, in_place ? PySequence_GetSlice(self->segment, start, start + header.length)
                                             : PyBytes_FromStringAndSize(at + HEADER_SIZE, header.length));
        if (PyTuple_GET_ITEM(record, 0) == NULL || PyTuple_GET_ITEM(record, 1) == NULL ||
            PyTuple_GET_ITEM(record, 2) == NULL || PyList_Append(records, record) < 0) {
            Py_DECREF(record);
            goto fail;
        }
        Py_DECREF(record);
        read += (HEADER_SIZE + header.length + 7) & ~7ull;
        count += 1;
    }
    self->position = read;
    self->records += count;
    return records;
fail:
    Py_DECREF(records);
    return NULL;
}

/* The per-batch steps: ring_core.WriterCore and ReaderCore describe each. */

/* Publish one of our positions, then wake the other side through `fd` if its flag says
   it waits (clearing the flag first: one byte per wait). */
static int announce_and_wake(const Core *self, int word, uint64_t value, int flag, int fd) {
    if (!announce_then_load(self, word, value, flag)) return 0;
    store_word(self, flag, 0);
    return poke(fd);
}

static PyObject *writer_publish(Core *self, PyObject *Py_UNUSED(unused)) {
    if (self->unpublished == 0) Py_RETURN_NONE;
    if (!attached(self)) return NULL;
    self->unpublished = self->unpublished_weight = 0;
    if (announce_and_wake(self, WORD_WRITE_POS, self->position, WORD_READER_SLEEPING, self->wake_fd) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *writer_wait_for_space(Core *self, PyObject *Py_UNUSED(unused)) {
    if (!attached(self)) return NULL;
    unsigned long long read = announce_then_load(self, WORD_WRITER_WAITING, 1, WORD_READ_POS);
    if (read != self->other) {
        self->other = read;
        store_word(self, WORD_WRITER_WAITING, 0);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *writer_space_woken(Core *self, PyObject *Py_UNUSED(unused)) {
    if (!attached(self) || drain(self->space_fd) < 0) return NULL;
    store_word(self, WORD_WRITER_WAITING, 0);
    self->other = load_word(self, WORD_READ_POS);
    Py_RETURN_NONE;
}

static PyObject *reader_mark_taken(Core *self, PyObject *Py_UNUSED(unused)) {
    if (!attached(self)) return NULL;
    store_word(self, WORD_RECORDS_READ, self->records);
    Py_RETURN_NONE;
}

static PyObject *reader_release(Core *self, PyObject *Py_UNUSED(unused)) {
    if (!attached(self)) return NULL;
    if (load_word(self, WORD_READ_POS) == self->position) Py_RETURN_NONE;
    store_word(self, WORD_RECORDS_READ, self->records);
    if (announce_and_wake(self, WORD_READ_POS, self->position, WORD_WRITER_WAITING, self->space_fd) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *reader_prepare_sleep(Core *self, PyObject *Py_UNUSED(unused)) {
    if (!attached(self)) return NULL;
    if (announce_then_load(self, WORD_READER_SLEEPING, 1, WORD_WRITE_POS) != self->position) {
        store_word(self, WORD_READER_SLEEPING, 0);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *reader_woken(Core *self, PyObject *Py_UNUSED(unused)) {
    if (!attached(self) || drain(self->wake_fd) < 0) return NULL;
    store_word(self, WORD_READER_SLEEPING, 0);
    Py_RETURN_NONE;
}

static PyMethodDef writer_methods[] = {
    {"try_write", (PyCFunction)(void (*)(void))writer_try_write, METH_FASTCALL,
     "Copy one record in, or return False when there is no room (nothing written)."},
    {"reserve", (PyCFunction)writer_reserve, METH_O,
     "Room for a record of up to `length` payload bytes: the payload's offset in the segment, or -1."},
    {"released", (PyCFunction)writer_released, METH_O,
     "The consumer is done up to `position`: publish it as the read position (ring_core.WriterCore.released)."},
    {"refer_to", (PyCFunction)(void (*)(void))writer_refer_to, METH_FASTCALL,
     "Write list parts that lie in `segment` as references (see ring_core.WriterCore.refer_to)."},
    {"commit", (PyCFunction)(void (*)(void))writer_commit, METH_FASTCALL,
     "commit(kind, conn_id, length, weight=1): make the first `length` reserved payload bytes (written in place) "
     "a record, of `weight` towards waking the consumer."},
    {"publish", (PyCFunction)writer_publish, METH_NOARGS,
     "Make written records visible; wake the consumer if it sleeps."},
    {"wait_for_space", (PyCFunction)writer_wait_for_space, METH_NOARGS,
     "Announce that we wait for room; True if room appeared meanwhile (then do not wait)."},
    {"space_woken", (PyCFunction)writer_space_woken, METH_NOARGS,
     "The space pipe is readable: drain it, clear the flag, see the consumer's position."},
    {"detach", (PyCFunction)core_detach, METH_NOARGS, "Let go of the segment's buffer (before it is closed)."},
    {NULL},
};

static PyMethodDef reader_methods[] = {
    {"mark_taken", (PyCFunction)reader_mark_taken, METH_NOARGS,
     "Publish how many records we have taken, before handling them."},
    {"release", (PyCFunction)reader_release, METH_NOARGS,
     "Publish our read position (and records taken); wake the producer if it waits for room."},
    {"prepare_sleep", (PyCFunction)reader_prepare_sleep, METH_NOARGS,
     "Say we are going to wait; False if records arrived meanwhile (drain again instead)."},
    {"woken", (PyCFunction)reader_woken, METH_NOARGS,
     "The data pipe is readable: drain it and clear the flag, before draining the ring."},
    {"read_batch", (PyCFunction)(void (*)(void))reader_read_batch, METH_FASTCALL,
     "Up to `limit` records as (kind, conn_id, payload); does not free them. Payloads are copies, "
     "or with in_place read-only views of the ring (their bytes are valid until release)."},
    {"detach", (PyCFunction)core_detach, METH_NOARGS, "Let go of the segment's buffer (before it is closed)."},
    {NULL},
};

static PyMemberDef writer_members[] = {
    {"capacity", T_ULONGLONG, offsetof(Core, capacity), READONLY, NULL},
    {"max_payload", T_PYSSIZET, offsetof(Core, max_payload), READONLY, NULL},
    {"rewind_at", T_ULONGLONG, offsetof(Core, rewind_at), 0, NULL},
    {"_write", T_ULONGLONG, offsetof(Core, position), 0, NULL},
    {"_read", T_ULONGLONG, offsetof(Core, other), 0, NULL},
    {"unpublished", T_ULONGLONG, offsetof(Core, unpublished), 0, NULL},
    {"unpublished_weight", T_ULONGLONG, offsetof(Core, unpublished_weight), 0, NULL},
    {"records_written", T_ULONGLONG, offsetof(Core, records), 0, NULL},
    {"wake_fd", T_INT, offsetof(Core, wake_fd), 0, NULL},
    {"space_fd", T_INT, offsetof(Core, space_fd), 0, NULL},
    {NULL},
};

static PyMemberDef reader_members[] = {
    {"capacity", T_ULONGLONG, offsetof(Core, capacity), READONLY, NULL},
    {"max_payload", T_PYSSIZET, offsetof(Core, max_payload), READONLY, NULL},
    {"_read", T_ULONGLONG, offsetof(Core, position), 0, NULL},
    {"_records_read", T_ULONGLONG, offsetof(Core, records), 0, NULL},
    {"wake_fd", T_INT, offsetof(Core, wake_fd), 0, NULL},
    {"space_fd", T_INT, offsetof(Core, space_fd), 0, NULL},
    {NULL},
};

static PyTypeObject WriterCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aserver.ipc._ring_core.WriterCore",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Producer end's per-record step (see ring_core.WriterCore).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = writer_methods,
    .tp_members = writer_members,
};

static PyTypeObject ReaderCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aserver.ipc._ring_core.ReaderCore",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Consumer end's per-record step (see ring_core.ReaderCore).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = reader_methods,
    .tp_members = reader_members,
};

/* SenderCore: the base of channel.RingSender, whose state these fields are (under the
   same names as in ring_core.SenderCore); RingSender supplies _wait and _publish. */
typedef struct {
    PyObject_HEAD
    PyObject *writer;   /* _writer: a RingWriter (a WriterCore) */
    PyObject *overflow; /* _overflow: records waiting for room */
    PyObject *loop;     /* _loop */
    unsigned long long early_publish, wake_bytes, wake_weight;
    char publish_scheduled;
} Sender;

static PyObject *s_wait, *s_publish, *s_publish_later, *s_call_soon;

/* A record was written: publish at the end of this loop iteration, or now (see
   ring_core.SenderCore._published_soon). A new reference, or NULL on error. */
static PyObject *published_soon(Sender *self, PyObject *writer, PyObject *loop) {
    const Core *core = (const Core *)writer;
    if (core->unpublished >= self->wake_bytes || core->unpublished_weight >= self->wake_weight ||
        (core->unpublished >= self->early_publish && !load_word(core, WORD_READER_SLEEPING)))
        return PyObject_CallMethodNoArgs(writer, s_publish);
    if (self->publish_scheduled) return Py_NewRef(Py_None);
    PyObject *later = PyObject_GetAttr((PyObject *)self, s_publish_later);
    PyObject *r = later ? PyObject_CallMethodOneArg(loop, s_call_soon, later) : NULL;
    Py_XDECREF(later);
    if (r != NULL) self->publish_scheduled = 1; /* only once it is scheduled */
    return r;
}

/* The sender's C writer and loop, with references of our own; 0 with an exception if unusable. */
static int writer_and_loop(Sender *self, PyObject **writer, PyObject **loop) {
    if (self->writer == NULL || !PyObject_TypeCheck(self->writer, &WriterCoreType) || self->loop == NULL) {
        PyErr_SetString(PyExc_TypeError, "SenderCore needs _writer (a C WriterCore) and _loop");
        return 0;
    }
    *writer = Py_NewRef(self->writer);
    *loop = Py_NewRef(self->loop);
    return 1;
}

static PyObject *sender_send(Sender *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send(kind, conn_id, payload)");
        return NULL;
    }
    /* Python code can run inside PyObject_Length and try_write (a __len__, a __buffer__):
       each field is taken with a reference of our own just before it is used. */
    PyObject *overflow = self->overflow;
    if (overflow == NULL) {
        PyErr_SetString(PyExc_TypeError, "SenderCore needs _overflow");
        return NULL;
    }
    Py_INCREF(overflow);
    Py_ssize_t waiting = PyObject_Length(overflow);
    Py_DECREF(overflow);
    if (waiting < 0) return NULL;
    if (waiting == 0) {
        PyObject *writer, *loop;
        if (!writer_and_loop(self, &writer, &loop)) return NULL;
        PyObject *written = writer_try_write((Core *)writer, args, 3);
        int ok = written == Py_True;
        Py_XDECREF(written);
        PyObject *r = ok ? published_soon(self, writer, loop) : NULL;
        Py_DECREF(writer);
        Py_DECREF(loop);
        if (written == NULL) return NULL;
        if (ok) {
            if (r == NULL) return NULL;
            Py_DECREF(r);
            Py_RETURN_TRUE;
        }
    }
    PyObject *call[4] = {(PyObject *)self, args[0], args[1], args[2]};
    return PyObject_VectorcallMethod(s_wait, call, 4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* reserve(length) -> writable memoryview | None: see ring_core.SenderCore.reserve. */
static PyObject *sender_reserve(Sender *self, PyObject *arg) {
    if (self->overflow == NULL) {
        PyErr_SetString(PyExc_TypeError, "SenderCore needs _overflow");
        return NULL;
    }
    PyObject *overflow = Py_NewRef(self->overflow);
    Py_ssize_t waiting = PyObject_Length(overflow);
    Py_DECREF(overflow);
    if (waiting < 0) return NULL;
    if (waiting) Py_RETURN_NONE;
    if (self->writer == NULL || !PyObject_TypeCheck(self->writer, &WriterCoreType)) {
        PyErr_SetString(PyExc_TypeError, "SenderCore needs _writer (a C WriterCore)");
        return NULL;
    }
    Core *writer = (Core *)Py_NewRef(self->writer);
    PyObject *result = NULL;
    PyObject *at = writer_reserve(writer, arg);
    if (at != NULL) {
        long long offset = PyLong_AsLongLong(at);
        Py_DECREF(at);
        if (offset < 0) {
            result = Py_NewRef(Py_None);
        } else if (writer->base != NULL) {
            /* A slice of the segment's own memoryview: the mapping cannot go while it lives. */
            result = PySequence_GetSlice(writer->view.obj, (Py_ssize_t)offset, (Py_ssize_t)offset + writer->reserved);
        }
    }
    Py_DECREF(writer);
    return result;
}

/* commit(kind, conn_id, length): see ring_core.SenderCore.commit. */
static PyObject *sender_commit(Sender *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *writer, *loop;
    if (!writer_and_loop(self, &writer, &loop)) return NULL;
    PyObject *r = commit_checked((Core *)writer, args, nargs) < 0 ? NULL : published_soon(self, writer, loop);
    Py_DECREF(writer);
    Py_DECREF(loop);
    return r;
}

static int sender_traverse(Sender *self, visitproc visit, void *arg) {
    Py_VISIT(self->writer);
    Py_VISIT(self->overflow);
    Py_VISIT(self->loop);
    return 0;
}

static int sender_clear(Sender *self) {
    Py_CLEAR(self->writer);
    Py_CLEAR(self->overflow);
    Py_CLEAR(self->loop);
    return 0;
}

static void sender_dealloc(Sender *self) {
    PyObject_GC_UnTrack(self);
    sender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef sender_methods[] = {
    {"send", (PyCFunction)(void (*)(void))sender_send, METH_FASTCALL,
     "Write one record and see that it is published, or queue it with _wait (see ring_core.SenderCore)."},
    {"reserve", (PyCFunction)sender_reserve, METH_O,
     "Room for a record of up to `length` payload bytes to fill in place, or None (see ring_core.SenderCore)."},
    {"commit", (PyCFunction)(void (*)(void))sender_commit, METH_FASTCALL,
     "commit(kind, conn_id, length, weight=1): send the first `length` bytes of the reserved room as a record."},
    {NULL},
};

static PyMemberDef sender_members[] = {
    {"_writer", T_OBJECT, offsetof(Sender, writer), 0, NULL},
    {"_overflow", T_OBJECT, offsetof(Sender, overflow), 0, NULL},
    {"_loop", T_OBJECT, offsetof(Sender, loop), 0, NULL},
    {"early_publish_bytes", T_ULONGLONG, offsetof(Sender, early_publish), 0, NULL},
    {"wake_bytes", T_ULONGLONG, offsetof(Sender, wake_bytes), 0, NULL},
    {"wake_weight", T_ULONGLONG, offsetof(Sender, wake_weight), 0, NULL},
    {"_publish_scheduled", T_BOOL, offsetof(Sender, publish_scheduled), 0, NULL},
    {NULL},
};

/* records_sent: the sequence number the next record will have (written or waiting). */
static PyObject *sender_records_sent(Sender *self, void *Py_UNUSED(closure)) {
    if (self->writer == NULL || !PyObject_TypeCheck(self->writer, &WriterCoreType) || self->overflow == NULL) {
        PyErr_SetString(PyExc_TypeError, "SenderCore needs _writer (a C WriterCore) and _overflow");
        return NULL;
    }
    unsigned long long written = ((Core *)self->writer)->records;
    Py_ssize_t waiting = PyObject_Length(self->overflow);
    if (waiting < 0) return NULL;
    return PyLong_FromUnsignedLongLong(written + (unsigned long long)waiting);
}

static PyGetSetDef sender_getset[] = {
    {"records_sent", (getter)sender_records_sent, NULL,
     "Sequence number the next record will have (written or waiting in overflow).", NULL},
    {NULL},
};

static PyTypeObject SenderCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aserver.ipc._ring_core.SenderCore",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "RingSender's per-record step (see ring_core.SenderCore).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_traverse = (traverseproc)sender_traverse,
    .tp_clear = (inquiry)sender_clear,
    .tp_methods = sender_methods,
    .tp_members = sender_members,
    .tp_getset = sender_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aserver.ipc._ring_core",
    .m_doc = "Ring record copy in C (see ring_core.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__ring_core(void) {
    if ((s_wait = PyUnicode_InternFromString("_wait")) == NULL ||
        (s_publish = PyUnicode_InternFromString("publish")) == NULL ||
        (s_publish_later = PyUnicode_InternFromString("_publish")) == NULL ||
        (s_call_soon = PyUnicode_InternFromString("call_soon")) == NULL)
        return NULL;
    if (PyType_Ready(&WriterCoreType) < 0 || PyType_Ready(&ReaderCoreType) < 0 || PyType_Ready(&SenderCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&WriterCoreType);
    Py_INCREF(&ReaderCoreType);
    Py_INCREF(&SenderCoreType);
    if (PyModule_AddIntConstant(m, "ABI", RING_CORE_ABI) < 0 ||
        PyModule_AddObject(m, "WriterCore", (PyObject *)&WriterCoreType) < 0 ||
        PyModule_AddObject(m, "ReaderCore", (PyObject *)&ReaderCoreType) < 0 ||
        PyModule_AddObject(m, "SenderCore", (PyObject *)&SenderCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
