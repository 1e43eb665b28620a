/* A connection's per-request steps in the conn process, in C (see conn_core.py, the
 * Python twin, reference and description).
 *
 * ConnCore is the base class of ClientProtocol, an asyncio BufferedProtocol. Its fields
 * are the connection's hot state, readable and writable from Python under the same names.
 * get_buffer hands the event loop room in the pinned worker's request ring, and
 * buffer_updated commits the complete packets that arrived there as one record; any
 * other read goes through the scratch buffer to ClientProtocol.receive, the general path,
 * so the C side has no policy of its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* What aserver/native.py expects: raise it whenever a call's signature or meaning
   changes, so a stale build is not used. */
#define CONN_CORE_ABI 5

/* The headers of a run of up to two requests are kept in its entry; a longer run's are
   allocated. */
#define INLINE_HEADERS 40
/* Runs in flight kept in the connection's own object; more go to an allocated array. */
#define INLINE_RUNS 2

/* A run of requests sent to a worker and not all answered yet (conn_core.InFlight). */
typedef struct {
    unsigned long long record; /* the ring record's sequence number */
    int worker;
    Py_ssize_t remaining;      /* requests of the run the worker has not finished */
    Py_ssize_t count;          /* requests in the run */
    union {                    /* each one's packet header, back to back: see run_headers */
        unsigned char inline_bytes[INLINE_HEADERS];
        unsigned char *allocated; /* PyMem */
    } headers;
} InFlightRun;

typedef struct {
    PyObject_HEAD
    int stage;               /* 0: framing packets; anything else goes to receive() */
    char partial;            /* the FrameDecoder holds the start of a packet */
    char progress;           /* a packet completed since the sweeper last looked */
    char closed, eof_sent, close_when_answered;
    char big_endian;
    char handed_over;        /* replies went to the transport: they may still be in its buffer */
    int fd;                  /* the socket, written directly while the transport holds nothing; -1: never */
    int worker;              /* the connection's worker (pinned routing) */
    unsigned long long conn_id;
    Py_ssize_t outstanding;  /* requests sent to workers and not answered yet */
    Py_ssize_t max_packet_size, max_reply_backlog;
    /* The runs in flight, oldest first, in a circular array: first_runs, in this object,
       until more are in flight. A run costs no memory of its own (but a long run's
       headers), where Python objects per run (a deque entry, a Struct, a bytes) cost
       about 3 µs per request at 1,000 connections, in cache misses. */
    InFlightRun *inflight;   /* first_runs or an allocated array; NULL before the first run */
    Py_ssize_t inflight_head, inflight_len, inflight_cap;
    InFlightRun first_runs[INLINE_RUNS];
    PyObject *replies;       /* list of reply runs not written yet */
    PyObject *transport;
    PyObject *link;          /* WorkerLink for the shortcut, or None */
    PyObject *stats;         /* the server's Counter */
    PyObject *scratch;       /* the server's read buffer, for reads that do not go into a ring */
    PyObject *reading;       /* the ring room (a memoryview) the current read goes to, or NULL */
} Core;

/* The room asked of the ring for a read, and then with less left (conn_core.READ_SIZE, SMALL_READ). */
static Py_ssize_t read_size, small_read;

/* Taken from the Python modules at import, so the two sides share one definition. */
static PyObject *InFlight; /* conn_core.InFlight: what take_inflight returns a run as */
static unsigned long packets_kind, close_kind, release_kind, by_ref_kind, ack_shift, kind_mask;
static Py_ssize_t header_size;
static PyObject *s_receive, *s_sender, *s_max_payload, *s_records_sent, *s_reserve, *s_commit,
    *s_requests, *s_replies_to_closed, *s_reply_bytes_by_reference, *s_close,
    *s_is_closing, *s_write, *s_get_write_buffer_size, *s_too_much_unread, *packets_obj;

static PyTypeObject CoreType;

static uint32_t get_u32(const unsigned char *p, int big) {
    return big ? ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3])
               : ((uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]);
}

/* stats[key] += n (a Counter: a missing key counts from 0). */
static int count_in(PyObject *stats, PyObject *key, Py_ssize_t n) {
    if (stats == NULL || !PyDict_Check(stats)) {
        PyErr_SetString(PyExc_TypeError, "ConnCore.stats must be a dict");
        return -1;
    }
    PyObject *old = PyDict_GetItemWithError(stats, key);
    if (old == NULL && PyErr_Occurred()) return -1;
    PyObject *add = PyLong_FromSsize_t(n);
    if (add == NULL) return -1;
    PyObject *sum = old ? PyNumber_Add(old, add) : Py_NewRef(add);
    Py_DECREF(add);
    if (sum == NULL) return -1;
    int failed = PyDict_SetItem(stats, key, sum);
    Py_DECREF(sum);
    return failed;
}

/* Copy the headers of the first `count` packets of run[:size] to `to`, back to back;
   -1 (ValueError) if the run holds fewer. */
static int copy_headers(unsigned char *to, const unsigned char *run, Py_ssize_t size, Py_ssize_t count, int big) {
    Py_ssize_t pos = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t length = size - pos >= 4 ? get_u32(run + pos, big) : 0;
        if (length < header_size || (Py_ssize_t)length > size - pos) {
            PyErr_Format(PyExc_ValueError, "run holds fewer than %zd packets", count);
            return -1;
        }
        memcpy(to, run + pos, header_size);
        to += header_size;
        pos += length;
    }
    return 0;
}

/* A worker index from Python (-1 with an exception if it is not an int's worth). */
static int as_worker(PyObject *value) {
    long worker = PyLong_AsLong(value);
    if (worker == -1 && PyErr_Occurred()) return -1;
    if (worker < INT_MIN || worker > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "worker index out of range");
        return -1;
    }
    return (int)worker;
}

static InFlightRun *run_at(Core *self, Py_ssize_t i) {
    return &self->inflight[(self->inflight_head + i) % self->inflight_cap];
}

static int headers_inline(const InFlightRun *entry) {
    return entry->count * header_size <= INLINE_HEADERS;
}

static unsigned char *run_headers(InFlightRun *entry) {
    return headers_inline(entry) ? entry->headers.inline_bytes : entry->headers.allocated;
}

static void free_run(InFlightRun *entry) {
    if (!headers_inline(entry)) PyMem_Free(entry->headers.allocated);
}

static int sent_impl(Core *self, int worker, unsigned long long record, Py_ssize_t count,
                     const unsigned char *run, Py_ssize_t size) {
    if (count < 0 || count > size / header_size) {
        PyErr_Format(PyExc_ValueError, "run holds fewer than %zd packets", count);
        return -1;
    }
    if (self->inflight == NULL) {
        self->inflight = self->first_runs;
        self->inflight_cap = INLINE_RUNS;
    }
    if (self->inflight_len == self->inflight_cap) { /* full: double, oldest first again */
        Py_ssize_t cap = self->inflight_cap * 2;
        InFlightRun *grown = PyMem_Malloc(cap * sizeof(InFlightRun));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < self->inflight_len; i++) grown[i] = *run_at(self, i);
        if (self->inflight != self->first_runs) PyMem_Free(self->inflight);
        self->inflight = grown;
        self->inflight_cap = cap;
        self->inflight_head = 0;
    }
    InFlightRun *entry = run_at(self, self->inflight_len);
    *entry = (InFlightRun){.record = record, .worker = worker, .remaining = count, .count = count};
    if (!headers_inline(entry) && (entry->headers.allocated = PyMem_Malloc(count * header_size)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (copy_headers(run_headers(entry), run, size, count, self->big_endian) < 0) {
        free_run(entry);
        return -1;
    }
    self->inflight_len += 1;
    self->outstanding += count;
    return 0;
}

/* Drop the answered runs at the front (a run answered behind another worker's stays
   until that one is); with none left, an allocated array goes back to first_runs. */
static void pop_answered(Core *self) {
    while (self->inflight_len && run_at(self, 0)->remaining == 0) {
        free_run(run_at(self, 0));
        self->inflight_head = (self->inflight_head + 1) % self->inflight_cap;
        self->inflight_len -= 1;
    }
    if (self->inflight_len == 0 && self->inflight != NULL && self->inflight != self->first_runs) {
        PyMem_Free(self->inflight);
        self->inflight = self->first_runs;
        self->inflight_cap = INLINE_RUNS;
        self->inflight_head = 0;
    }
}

/* Forget the run sent last (its record was not written after all). */
static void unsend_last(Core *self) {
    InFlightRun *entry = run_at(self, self->inflight_len - 1);
    self->outstanding -= entry->remaining;
    free_run(entry);
    self->inflight_len -= 1;
}

static void answered_impl(Core *self, int worker, Py_ssize_t count) {
    self->outstanding -= count;
    for (Py_ssize_t i = 0; count && i < self->inflight_len; i++) {
        InFlightRun *entry = run_at(self, i);
        if (entry->worker != worker) continue;
        Py_ssize_t done = entry->remaining < count ? entry->remaining : count;
        entry->remaining -= done;
        count -= done;
    }
    pop_answered(self);
}

static void free_inflight(Core *self) {
    for (Py_ssize_t i = 0; i < self->inflight_len; i++) free_run(run_at(self, i));
    if (self->inflight != self->first_runs) PyMem_Free(self->inflight);
    self->inflight = NULL;
    self->inflight_head = self->inflight_len = self->inflight_cap = 0;
}

/* A run as an InFlight(record, remaining, headers), or with `with_worker` as a tuple
   (worker, record, remaining, headers). */
static PyObject *run_tuple(InFlightRun *entry, int with_worker) {
    PyObject *headers = PyBytes_FromStringAndSize((const char *)run_headers(entry), entry->count * header_size);
    if (headers == NULL) return NULL;
    if (with_worker) return Py_BuildValue("(iKnN)", entry->worker, entry->record, entry->remaining, headers);
    return PyObject_CallFunction(InFlight, "KnN", entry->record, entry->remaining, headers);
}

/* 1: the first reply queued since the last flush; 0: not the first; -1: error. */
static int queue_reply_impl(Core *self, PyObject *packets) {
    if (self->replies == NULL || !PyList_Check(self->replies)) {
        PyErr_SetString(PyExc_TypeError, "ConnCore._replies must be a list");
        return -1;
    }
    if (PyList_Append(self->replies, packets) < 0) return -1;
    return PyList_GET_SIZE(self->replies) == 1;
}

/* The general path: ClientProtocol.receive(data). */
static PyObject *receive(Core *self, PyObject *data) {
    return PyObject_CallMethodOneArg((PyObject *)self, s_receive, data);
}

static PyObject *scratch_buffer(Core *self) {
    if (self->scratch == NULL) {
        PyErr_SetString(PyExc_TypeError, "ConnCore.scratch must be a writable buffer");
        return NULL;
    }
    return Py_NewRef(self->scratch);
}

/* sender.reserve(size): ring room (a memoryview) or None. */
static PyObject *reserve(PyObject *sender, Py_ssize_t size) {
    PyObject *want = PyLong_FromSsize_t(size);
    if (want == NULL) return NULL;
    PyObject *room = PyObject_CallMethodOneArg(sender, s_reserve, want);
    Py_DECREF(want);
    return room;
}

/* get_buffer(sizehint): see conn_core.ConnCore.get_buffer. */
static PyObject *core_get_buffer(Core *self, PyObject *Py_UNUSED(sizehint)) {
    Py_CLEAR(self->reading);
    if (self->stage || self->partial || self->link == NULL || self->link == Py_None) return scratch_buffer(self);
    PyObject *sender = PyObject_GetAttr(self->link, s_sender);
    if (sender == NULL) return NULL;
    PyObject *limit = PyObject_GetAttr(sender, s_max_payload);
    Py_ssize_t max_payload = limit ? PyLong_AsSsize_t(limit) : -1;
    Py_XDECREF(limit);
    PyObject *room = NULL;
    if (!(max_payload == -1 && PyErr_Occurred())) {
        room = reserve(sender, max_payload < read_size ? max_payload : read_size);
        if (room == Py_None && max_payload > small_read) {
            Py_DECREF(room);
            room = reserve(sender, small_read);
        }
    }
    Py_DECREF(sender);
    if (room == NULL) return NULL;
    if (room == Py_None) {
        Py_DECREF(room);
        return scratch_buffer(self);
    }
    self->reading = Py_NewRef(room);
    return room;
}

/* The bytes buf[start:end] to ClientProtocol.receive. */
static int receive_copy(Core *self, const char *buf, Py_ssize_t start, Py_ssize_t end) {
    PyObject *data = PyBytes_FromStringAndSize(buf + start, end - start);
    if (data == NULL) return -1;
    PyObject *r = receive(self, data);
    Py_DECREF(data);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Commit `count` complete packets, run[:end], read into the reserved room as one record. */
static int commit_run(Core *self, const unsigned char *run, Py_ssize_t end, Py_ssize_t count) {
    PyObject *sender = PyObject_GetAttr(self->link, s_sender);
    if (sender == NULL) return -1;
    self->progress = 1;
    PyObject *record = NULL, *length = NULL, *conn_id = NULL, *weight = NULL, *done = NULL;
    unsigned long long number = 0;
    if ((record = PyObject_GetAttr(sender, s_records_sent)) != NULL &&
        ((number = PyLong_AsUnsignedLongLong(record)) != (unsigned long long)-1 || !PyErr_Occurred()) &&
        sent_impl(self, self->worker, number, count, run, end) == 0) {
        /* weighed by its requests: see ring_core.WriterCore.commit */
        if ((length = PyLong_FromSsize_t(end)) != NULL && (conn_id = PyLong_FromUnsignedLongLong(self->conn_id)) != NULL &&
            (weight = PyLong_FromSsize_t(count)) != NULL) {
            PyObject *args[5] = {sender, packets_obj, conn_id, length, weight};
            done = PyObject_VectorcallMethod(s_commit, args, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        }
        if (done == NULL) unsend_last(self); /* no record: nothing in flight either */
        else if (count_in(self->stats, s_requests, count) < 0) Py_CLEAR(done);
    }
    Py_XDECREF(weight);
    Py_XDECREF(record);
    Py_XDECREF(length);
    Py_XDECREF(conn_id);
    Py_DECREF(sender);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* buffer_updated(nbytes): see conn_core.ConnCore.buffer_updated. */
static PyObject *core_buffer_updated(Core *self, PyObject *arg) {
    Py_ssize_t nbytes = PyLong_AsSsize_t(arg);
    if (nbytes == -1 && PyErr_Occurred()) return NULL;
    PyObject *room = self->reading; /* our reference now */
    self->reading = NULL;
    if (room == Py_None) Py_CLEAR(room); /* (as ClientProtocolBase starts it) */
    PyObject *source = room ? room : self->scratch;
    if (source == NULL) return scratch_buffer(self);
    Py_buffer view;
    if (PyObject_GetBuffer(source, &view, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(room);
        return NULL;
    }
    int failed = 0;
    if (nbytes < 0 || nbytes > view.len) {
        PyErr_Format(PyExc_ValueError, "buffer_updated(%zd): the buffer holds %zd bytes", nbytes, view.len);
        failed = 1;
    } else if (room == NULL) {
        failed = receive_copy(self, view.buf, 0, nbytes);
    } else {
        const unsigned char *p = view.buf;
        Py_ssize_t end = 0, count = 0;
        int big = self->big_endian;
        while (nbytes - end >= 4) {
            uint32_t length = get_u32(p + end, big);
            if (length < header_size || length > self->max_packet_size || nbytes - end < (Py_ssize_t)length)
                break; /* cut short or a bad length: receive() keeps the start or says why */
            end += length;
            count += 1;
        }
        if (count) failed = commit_run(self, p, end, count);
        if (!failed && end < nbytes) failed = receive_copy(self, view.buf, end, nbytes);
    }
    PyBuffer_Release(&view);
    Py_XDECREF(room);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_sent(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "sent(worker, record, count, run)");
        return NULL;
    }
    int worker = as_worker(args[0]);
    if (worker == -1 && PyErr_Occurred()) return NULL;
    unsigned long long record = PyLong_AsUnsignedLongLong(args[1]);
    if (record == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[2]);
    if (count == -1 && PyErr_Occurred()) return NULL;
    Py_buffer run;
    if (PyObject_GetBuffer(args[3], &run, PyBUF_SIMPLE) < 0) return NULL;
    int failed = sent_impl(self, worker, record, count, run.buf, run.len) < 0;
    PyBuffer_Release(&run);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_answered(Core *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "answered(worker, count)");
        return NULL;
    }
    int worker = as_worker(args[0]);
    if (worker == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    if (count == -1 && PyErr_Occurred()) return NULL;
    answered_impl(self, worker, count);
    Py_RETURN_NONE;
}

/* take_inflight(worker): see conn_core.ConnCore.take_inflight. */
static PyObject *core_take_inflight(Core *self, PyObject *arg) {
    int worker = as_worker(arg);
    if (worker == -1 && PyErr_Occurred()) return NULL;
    PyObject *taken = PyList_New(0);
    if (taken == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->inflight_len; i++) {
        InFlightRun *entry = run_at(self, i);
        if (entry->worker != worker || entry->remaining == 0) continue;
        PyObject *item = run_tuple(entry, 0);
        if (item == NULL || PyList_Append(taken, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(taken);
            return NULL;
        }
        Py_DECREF(item);
    }
    /* Nothing can fail from here: drop that worker's runs, keep the others in order. */
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < self->inflight_len; i++) {
        InFlightRun entry = *run_at(self, i);
        if (entry.worker == worker) free_run(&entry);
        else *run_at(self, kept++) = entry;
    }
    self->inflight_len = kept;
    pop_answered(self);
    return taken;
}

/* in_flight(): see conn_core.ConnCore.in_flight. */
static PyObject *core_in_flight(Core *self, PyObject *Py_UNUSED(unused)) {
    PyObject *runs = PyList_New(self->inflight_len);
    if (runs == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->inflight_len; i++) {
        PyObject *item = run_tuple(run_at(self, i), 1);
        if (item == NULL) {
            Py_DECREF(runs);
            return NULL;
        }
        PyList_SET_ITEM(runs, i, item);
    }
    return runs;
}

static PyObject *core_queue_reply(Core *self, PyObject *packets) {
    int first = queue_reply_impl(self, packets);
    if (first < 0) return NULL;
    return PyBool_FromLong(first);
}

/* Up to this many replies go out in one sendmsg. */
#define IOV_BATCH 64

/* Writes what it can of `replies` straight to the socket. Sets *sent to the bytes written
   (0 when the socket takes nothing now or has failed: the transport then meets the error
   itself) and *total to the bytes of all replies. -1 with an exception: not a buffer. */
static int send_directly(int fd, PyObject *replies, Py_ssize_t *sent, Py_ssize_t *total) {
    Py_ssize_t count = PyList_GET_SIZE(replies);
    int writing = 1; /* until the socket takes less than it is given: no later chunk may
                        then go out ahead of the rest of an earlier one */
    *sent = *total = 0;
    for (Py_ssize_t first = 0; first < count; first += IOV_BATCH) {
        Py_buffer views[IOV_BATCH];
        struct iovec iov[IOV_BATCH];
        Py_ssize_t n = count - first < IOV_BATCH ? count - first : IOV_BATCH, pinned = 0, wanted = 0;
        for (; pinned < n; pinned++) {
            if (PyObject_GetBuffer(PyList_GET_ITEM(replies, first + pinned), &views[pinned], PyBUF_SIMPLE) < 0) break;
            iov[pinned].iov_base = views[pinned].buf;
            iov[pinned].iov_len = (size_t)views[pinned].len;
            wanted += views[pinned].len;
        }
        ssize_t written = 0;
        if (pinned == n && writing) {
            struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
            do written = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
            while (written < 0 && errno == EINTR);
            if (written < 0) written = 0;
            writing = written == wanted;
            *sent += written;
        }
        for (Py_ssize_t i = 0; i < pinned; i++) PyBuffer_Release(&views[i]);
        if (pinned < n) return -1;
        *total += wanted;
    }
    return 0;
}

/* The bytes of all replies, or -1 with an exception. */
static Py_ssize_t bytes_in(PyObject *replies) {
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(replies); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(replies, i), &view, PyBUF_SIMPLE) < 0) return -1;
        total += view.len;
        PyBuffer_Release(&view);
    }
    return total;
}

/* The replies after the first `skip` of their `total` bytes, as one bytes object (the
   transport keeps what it is given, and views into a ring must not outlive the batch). */
static PyObject *rest_after(PyObject *replies, Py_ssize_t skip, Py_ssize_t total) {
    PyObject *rest = PyBytes_FromStringAndSize(NULL, total - skip);
    if (rest == NULL) return NULL;
    char *out = PyBytes_AS_STRING(rest), *end = out + (total - skip);
    int grew = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(replies); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyList_GET_ITEM(replies, i), &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(rest);
            return NULL;
        }
        Py_ssize_t n = view.len - skip; /* this reply's bytes not written yet */
        grew = n > end - out; /* bigger than when it was measured */
        if (n > 0 && !grew) {
            memcpy(out, (char *)view.buf + skip, (size_t)n);
            out += n;
        }
        skip = n < 0 ? -n : 0;
        PyBuffer_Release(&view);
        if (grew) break;
    }
    if (grew || out != end) {
        Py_DECREF(rest);
        PyErr_SetString(PyExc_RuntimeError, "a queued reply changed size before it was written");
        return NULL;
    }
    return rest;
}

/* The transport's write buffer size, or -1 with an exception. */
static Py_ssize_t transport_backlog(PyObject *transport) {
    PyObject *size = PyObject_CallMethodNoArgs(transport, s_get_write_buffer_size);
    if (size == NULL) return -1;
    Py_ssize_t backlog = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    return backlog;
}

static int flush_to(Core *self, PyObject *transport, PyObject *replies) {
    Py_ssize_t sent = 0, total = -1;
    if (self->fd >= 0 && self->handed_over) { /* direct again once the transport is empty */
        Py_ssize_t backlog = transport_backlog(transport);
        if (backlog < 0) return -1;
        self->handed_over = backlog > 0;
    }
    if (self->fd >= 0 && !self->handed_over) {
        if (send_directly(self->fd, replies, &sent, &total) < 0) return -1;
        if (sent == total) return 0;
    }
    if (total < 0 && (total = bytes_in(replies)) < 0) return -1; /* not sent directly */
    PyObject *rest = rest_after(replies, sent, total);
    if (rest == NULL) return -1;
    PyObject *written = PyObject_CallMethodOneArg(transport, s_write, rest);
    Py_DECREF(rest);
    if (written == NULL) return -1;
    Py_DECREF(written);
    self->handed_over = 1;
    Py_ssize_t backlog = transport_backlog(transport);
    if (backlog < 0) return -1;
    if (backlog > self->max_reply_backlog) {
        PyObject *size = PyLong_FromSsize_t(backlog);
        PyObject *r = size ? PyObject_CallMethodOneArg((PyObject *)self, s_too_much_unread, size) : NULL;
        Py_XDECREF(size);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    return 0;
}

static PyObject *core_flush_replies(Core *self, PyObject *unused) {
    PyObject *replies = self->replies;
    if (replies == NULL || !PyList_Check(replies) || PyList_GET_SIZE(replies) == 0) Py_RETURN_NONE;
    PyObject *fresh = PyList_New(0);
    if (fresh == NULL) return NULL;
    self->replies = fresh; /* `replies` is now our reference */
    PyObject *transport = self->transport;
    if (self->closed || self->eof_sent || transport == NULL || transport == Py_None) {
        Py_DECREF(replies); /* late replies (a stop that timed out) are dropped */
        Py_RETURN_NONE;
    }
    Py_INCREF(transport);
    PyObject *closing = PyObject_CallMethodNoArgs(transport, s_is_closing);
    int is_closing = closing ? PyObject_IsTrue(closing) : -1;
    Py_XDECREF(closing);
    /* A closing transport's socket may be closed already, and its number reused. */
    int failed = is_closing < 0 || (is_closing == 0 && flush_to(self, transport, replies) < 0);
    Py_DECREF(transport);
    Py_DECREF(replies);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

/* A PACKETS_BY_REF entry (records.REF_ENTRY). */
typedef struct {
    uint32_t inline_length;
    uint32_t ref_length;
    uint64_t ref_offset;
} RefEntry;

/* Queue a PACKETS_BY_REF record's parts on `core` (conn_core.referred_parts): views of
   its inline bytes and of the request ring bytes it refers to, adding those to *referred.
   1: the first reply queued since the last flush; 0: not; -1: error. */
static int queue_referred(Core *core, PyObject *payload, PyObject *requests, Py_ssize_t *referred) {
    Py_buffer record, ring;
    if (PyObject_GetBuffer(payload, &record, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(requests, &ring, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&record);
        return -1;
    }
    int first = 0;
    /* The whole record is checked before any of it is queued: a view queued from a bad
       record would outlive the batch whose rings it points into. */
    for (int queueing = 0; queueing < 2; queueing++) {
        Py_ssize_t pos = 0, size = record.len;
        while (pos < size) {
            RefEntry entry;
            if (size - pos < (Py_ssize_t)sizeof entry) goto cut;
            memcpy(&entry, (char *)record.buf + pos, sizeof entry);
            pos += sizeof entry;
            if ((Py_ssize_t)entry.inline_length > size - pos) goto cut;
            if (entry.ref_length &&
                (entry.ref_offset > (uint64_t)ring.len || entry.ref_length > (uint64_t)ring.len - entry.ref_offset)) {
                PyErr_Format(PyExc_ValueError, "PACKETS_BY_REF refers past its request ring (%llu + %lu)",
                             (unsigned long long)entry.ref_offset, (unsigned long)entry.ref_length);
                goto fail;
            }
            if (queueing && entry.inline_length) {
                PyObject *part = PySequence_GetSlice(payload, pos, pos + entry.inline_length);
                int queued = part ? queue_reply_impl(core, part) : -1;
                Py_XDECREF(part);
                if (queued < 0) goto fail;
                first |= queued;
            }
            pos += entry.inline_length;
            if (queueing && entry.ref_length) {
                PyObject *part = PySequence_GetSlice(requests, (Py_ssize_t)entry.ref_offset,
                                                     (Py_ssize_t)(entry.ref_offset + entry.ref_length));
                int queued = part ? queue_reply_impl(core, part) : -1;
                Py_XDECREF(part);
                if (queued < 0) goto fail;
                first |= queued;
                *referred += (Py_ssize_t)entry.ref_length;
            }
        }
    }
    PyBuffer_Release(&record);
    PyBuffer_Release(&ring);
    return first;
cut:
    PyErr_SetString(PyExc_ValueError, "PACKETS_BY_REF record cut short");
fail:
    PyBuffer_Release(&record);
    PyBuffer_Release(&ring);
    return -1;
}

/* route_replies(connections, pending, stats, worker, batch, requests): see conn_core.py. */
static PyObject *core_route_replies(PyObject *unused, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6 || !PyDict_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "route_replies(connections: dict, pending: list, stats, worker, batch: list, requests)");
        return NULL;
    }
    PyObject *connections = args[0], *pending = args[1], *stats = args[2], *batch = args[4];
    PyObject *requests = args[5];
    int worker = as_worker(args[3]);
    if (worker == -1 && PyErr_Occurred()) return NULL;
    unsigned long long released = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
        PyObject *item = PyList_GET_ITEM(batch, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "a reply record must be (kind, conn_id, payload)");
            return NULL;
        }
        unsigned long kind = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(item, 0));
        if (kind == (unsigned long)-1 && PyErr_Occurred()) return NULL;
        if (kind == release_kind) {
            released = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 1));
            if (released == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
            continue;
        }
        PyObject *payload = PyTuple_GET_ITEM(item, 2);
        Py_ssize_t payload_size = PyObject_Length(payload);
        if (payload_size < 0) return NULL;
        PyObject *conn = PyDict_GetItemWithError(connections, PyTuple_GET_ITEM(item, 1));
        if (conn == NULL) {
            if (PyErr_Occurred()) return NULL;
            if (payload_size && count_in(stats, s_replies_to_closed, 1) < 0) return NULL;
            continue;
        }
        if (!PyObject_TypeCheck(conn, &CoreType)) {
            PyErr_SetString(PyExc_TypeError, "route_replies: a connection is not a ConnCore");
            return NULL;
        }
        Py_ssize_t acks = (Py_ssize_t)(kind >> ack_shift);
        kind &= kind_mask;
        Core *core = (Core *)Py_NewRef(conn); /* ours while close() may drop it from the dict */
        int failed = 0;
        if (kind == packets_kind) {
            if (payload_size) {
                int first = queue_reply_impl(core, payload);
                failed = first < 0 || (first && PyList_Append(pending, conn) < 0);
            }
        } else if (kind == by_ref_kind) {
            Py_ssize_t referred = 0;
            int first = queue_referred(core, payload, requests, &referred);
            failed = first < 0 || (first && PyList_Append(pending, conn) < 0) ||
                     count_in(stats, s_reply_bytes_by_reference, referred) < 0;
        } else if (kind == close_kind) {
            PyObject *r = PyObject_CallMethodNoArgs(conn, s_close);
            failed = r == NULL;
            Py_XDECREF(r);
        }
        if (!failed && acks) {
            answered_impl(core, worker, acks);
            if (core->close_when_answered && !core->outstanding) {
                PyObject *r = PyObject_CallMethodNoArgs(conn, s_close);
                failed = r == NULL;
                Py_XDECREF(r);
            }
        }
        Py_DECREF(conn);
        if (failed) return NULL;
    }
    return PyLong_FromUnsignedLongLong(released);
}

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Core *self = (Core *)PyType_GenericNew(type, args, kwargs);
    if (self != NULL) self->fd = -1; /* not 0: that is stdin */
    return (PyObject *)self;
}

static int core_traverse(Core *self, visitproc visit, void *arg) {
    Py_VISIT(self->replies);
    Py_VISIT(self->transport);
    Py_VISIT(self->link);
    Py_VISIT(self->stats);
    Py_VISIT(self->scratch);
    Py_VISIT(self->reading);
    return 0;
}

static int core_clear(Core *self) {
    Py_CLEAR(self->replies);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->link);
    Py_CLEAR(self->stats);
    Py_CLEAR(self->scratch);
    Py_CLEAR(self->reading);
    return 0;
}

static void core_dealloc(Core *self) {
    PyObject_GC_UnTrack(self);
    core_clear(self);
    free_inflight(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef core_methods[] = {
    {"get_buffer", (PyCFunction)core_get_buffer, METH_O,
     "Where the next read goes: room in the pinned worker's ring, or the scratch buffer."},
    {"buffer_updated", (PyCFunction)core_buffer_updated, METH_O,
     "A read arrived: its complete packets in the ring become a record; the rest goes to receive()."},
    {"sent", (PyCFunction)(void (*)(void))core_sent, METH_FASTCALL,
     "sent(worker, record, count, run): count requests went to worker as ring record `record`."},
    {"answered", (PyCFunction)(void (*)(void))core_answered, METH_FASTCALL,
     "answered(worker, count): the worker finished count more of our requests (in order)."},
    {"take_inflight", (PyCFunction)core_take_inflight, METH_O,
     "take_inflight(worker): its runs not fully answered, as (record, remaining, headers), forgotten here."},
    {"in_flight", (PyCFunction)core_in_flight, METH_NOARGS,
     "Every run in flight, oldest first, as (worker, record, remaining, headers)."},
    {"queue_reply", (PyCFunction)core_queue_reply, METH_O,
     "Buffer replies until flush_replies; returns True if this is the first."},
    {"flush_replies", (PyCFunction)core_flush_replies, METH_NOARGS, "Write the buffered replies."},
    {"route_replies", (PyCFunction)(void (*)(void))core_route_replies, METH_FASTCALL | METH_STATIC,
     "route_replies(connections, pending, stats, worker, batch, requests): see conn_core.py."},
    {NULL},
};

static PyMemberDef core_members[] = {
    {"stage", T_INT, offsetof(Core, stage), 0, NULL},
    {"partial", T_BOOL, offsetof(Core, partial), 0, NULL},
    {"progress", T_BOOL, offsetof(Core, progress), 0, NULL},
    {"closed", T_BOOL, offsetof(Core, closed), 0, NULL},
    {"eof_sent", T_BOOL, offsetof(Core, eof_sent), 0, NULL},
    {"close_when_answered", T_BOOL, offsetof(Core, close_when_answered), 0, NULL},
    {"big_endian", T_BOOL, offsetof(Core, big_endian), 0, NULL},
    {"worker", T_INT, offsetof(Core, worker), 0, NULL},
    {"fd", T_INT, offsetof(Core, fd), 0, NULL},
    {"handed_over", T_BOOL, offsetof(Core, handed_over), 0, NULL},
    {"conn_id", T_ULONGLONG, offsetof(Core, conn_id), 0, NULL},
    {"outstanding", T_PYSSIZET, offsetof(Core, outstanding), 0, NULL},
    {"max_packet_size", T_PYSSIZET, offsetof(Core, max_packet_size), 0, NULL},
    {"max_reply_backlog", T_PYSSIZET, offsetof(Core, max_reply_backlog), 0, NULL},
    {"_replies", T_OBJECT, offsetof(Core, replies), 0, NULL},
    {"transport", T_OBJECT, offsetof(Core, transport), 0, NULL},
    {"link", T_OBJECT, offsetof(Core, link), 0, NULL},
    {"stats", T_OBJECT, offsetof(Core, stats), 0, NULL},
    {"scratch", T_OBJECT, offsetof(Core, scratch), 0, NULL},
    {"reading", T_OBJECT, offsetof(Core, reading), 0, NULL},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aserver.conn._conn_core.ConnCore",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A connection's per-request steps (see aserver/conn/conn_core.py).",
    .tp_new = core_new,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_members = core_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aserver.conn._conn_core",
    .m_doc = "A connection's per-request steps in C.",
    .m_size = -1,
};

static int constant(PyObject *module, const char *name, unsigned long *out) {
    PyObject *value = PyObject_GetAttrString(module, name);
    if (value == NULL) return -1;
    *out = PyLong_AsUnsignedLong(value);
    Py_DECREF(value);
    return *out == (unsigned long)-1 && PyErr_Occurred() ? -1 : 0;
}

static int take_shared(void) {
    PyObject *conn_core = PyImport_ImportModule("aserver.conn.conn_core");
    PyObject *records = PyImport_ImportModule("aserver.ipc.records");
    PyObject *header = PyImport_ImportModule("aserver.protocol.header");
    unsigned long size = 0, most = 0, small = 0;
    int failed = conn_core == NULL || records == NULL || header == NULL ||
                 (InFlight = PyObject_GetAttrString(conn_core, "InFlight")) == NULL ||
                 constant(records, "PACKETS", &packets_kind) < 0 || constant(records, "CLOSE", &close_kind) < 0 ||
                 constant(records, "RELEASE", &release_kind) < 0 ||
                 constant(records, "PACKETS_BY_REF", &by_ref_kind) < 0 ||
                 constant(records, "ACK_SHIFT", &ack_shift) < 0 || constant(records, "KIND_MASK", &kind_mask) < 0 ||
                 constant(header, "HEADER_SIZE", &size) < 0 || constant(conn_core, "READ_SIZE", &most) < 0 ||
                 constant(conn_core, "SMALL_READ", &small) < 0 ||
                 (packets_obj = PyLong_FromUnsignedLong(packets_kind)) == NULL;
    header_size = (Py_ssize_t)size;
    read_size = (Py_ssize_t)most;
    small_read = (Py_ssize_t)small;
    Py_XDECREF(conn_core);
    Py_XDECREF(records);
    Py_XDECREF(header);
    return failed ? -1 : 0;
}

static int intern_names(void) {
#define NAME(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    NAME(s_receive, "receive");
    NAME(s_sender, "sender");
    NAME(s_max_payload, "max_payload");
    NAME(s_records_sent, "records_sent");
    NAME(s_reserve, "reserve");
    NAME(s_commit, "commit");
    NAME(s_requests, "requests");
    NAME(s_replies_to_closed, "replies_to_closed");
    NAME(s_reply_bytes_by_reference, "reply_bytes_by_reference");
    NAME(s_close, "close");
    NAME(s_is_closing, "is_closing");
    NAME(s_write, "write");
    NAME(s_get_write_buffer_size, "get_write_buffer_size");
    NAME(s_too_much_unread, "too_much_unread");
#undef NAME
    return 0;
}

PyMODINIT_FUNC PyInit__conn_core(void) {
    if (intern_names() < 0 || take_shared() < 0 || PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddIntConstant(m, "ABI", CONN_CORE_ABI) < 0 ||
        PyModule_AddObject(m, "ConnCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
