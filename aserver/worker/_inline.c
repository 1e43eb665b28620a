/* The worker's inline loop for the common case, in C (see Dispatcher._run_inline).
 *
 * InlineRunner.run(conn, payload, pos) walks the record's packets from `pos` (payload: any
 * buffer, e.g. a view of the ring; each Request gets its body as a bytes copy, or for the
 * cmd_ids in `zero_copy` as a read-only memoryview slice of the payload, appended to
 * `kept` when the handler still holds it afterwards, for Python to release): for each
 * one with a sync handler it builds the Request, calls the handler and, when the result
 * is bytes that fit (or None), packs the reply into the connection's box exactly as
 * Dispatcher._answer does. It returns (pos, ran, unusual):
 *   - unusual is None: it stopped at `pos` because that packet's handler is async (or
 *     there is none), or at the end of the record;
 *   - otherwise the packet before `pos` ran and needs Python to answer it:
 *     unusual = (seq, cmd, user, handler, result, exception), one of the last two None.
 * Python handles every unusual case (errors, Reply objects, closed connections, replies
 * too big) and calls run() again, so the C side has no policy of its own.
 *
 * With metrics, a request's latency and a reply are counted straight into the
 * WorkerMetrics' dicts when its series is there already; a cmd's first request, or one
 * counted under another series, goes through WorkerMetrics.observe/reply (aserver/metrics.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* What aserver/native.py expects: raise it whenever a call's signature or meaning
   changes, so a stale build is not used. */
#define INLINE_ABI 4

#define HEADER_SIZE 18

/* aserver.metrics.LATENCY_BUCKETS, read at import. */
#define MAX_BOUNDS 64
static double bounds[MAX_BOUNDS];
static Py_ssize_t nbounds;

typedef struct {
    PyObject_HEAD
    PyObject *handlers;      /* dict: cmd -> sync handler, or None if async */
    PyObject *fallback;      /* sync fallback handler or None */
    PyObject *outbox;        /* dict: conn_id -> box */
    PyObject *new_box;       /* callable(conn_id) -> box */
    PyObject *request_type;  /* aserver.app.Request */
    PyObject *cancelled;     /* asyncio.CancelledError */
    PyObject *metrics;       /* WorkerMetrics or None */
    PyObject *latency;       /* its dicts (metrics.latency, metrics.replies), or NULL */
    PyObject *replies;
    PyObject *zero_copy;     /* frozenset of cmd_ids whose handlers take memoryview bodies */
    PyObject *kept;          /* list: body views still held after their handler returned */
    int fallback_zero_copy;
    PyObject *toreadonly_name; /* "toreadonly" */
    PyObject *release_name;  /* "release" */
    PyObject *closed_name;   /* "closed" */
    PyObject *id_name;       /* "id" */
    PyObject *observe_name;  /* "observe" */
    PyObject *reply_name;    /* "reply" */
    int big_endian;
    Py_ssize_t max_body;
} Runner;

static uint32_t get_u32(const unsigned char *p, int big) {
    return big ? ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3])
               : ((uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]);
}

static uint16_t get_u16(const unsigned char *p, int big) {
    return big ? (uint16_t)(p[0] << 8 | p[1]) : (uint16_t)(p[1] << 8 | p[0]);
}

static void put_u32(unsigned char *p, uint32_t v, int big) {
    for (int i = 0; i < 4; i++) p[big ? 3 - i : i] = (unsigned char)(v >> (8 * i));
}

static void put_u16(unsigned char *p, uint16_t v, int big) {
    p[big ? 1 : 0] = (unsigned char)v;
    p[big ? 0 : 1] = (unsigned char)(v >> 8);
}

static int runner_init(Runner *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"handlers", "fallback", "outbox", "new_box", "request_type", "cancelled",
                            "big_endian", "max_body", "metrics", "zero_copy", "fallback_zero_copy", "kept", NULL};
    PyObject *handlers, *fallback, *outbox, *new_box, *request_type, *cancelled, *metrics = Py_None;
    PyObject *zero_copy = NULL, *kept = NULL;
    int big_endian, fallback_zero_copy = 0;
    Py_ssize_t max_body;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO!OOOpn|OO!pO!", names, &PyDict_Type, &handlers, &fallback,
                                     &PyDict_Type, &outbox, &new_box, &request_type, &cancelled, &big_endian,
                                     &max_body, &metrics, &PyFrozenSet_Type, &zero_copy, &fallback_zero_copy,
                                     &PyList_Type, &kept))
        return -1;
    if ((zero_copy != NULL || fallback_zero_copy) && kept == NULL) {
        PyErr_SetString(PyExc_TypeError, "zero_copy needs a kept list");
        return -1;
    }
    PyObject *latency = NULL, *replies = NULL; /* checked before any field changes */
    if (metrics != Py_None) {
        latency = PyObject_GetAttrString(metrics, "latency");
        replies = latency ? PyObject_GetAttrString(metrics, "replies") : NULL;
        if (replies != NULL && (!PyDict_CheckExact(latency) || !PyDict_CheckExact(replies)))
            PyErr_SetString(PyExc_TypeError, "metrics.latency and metrics.replies must be dicts");
        if (PyErr_Occurred()) {
            Py_XDECREF(latency);
            Py_XDECREF(replies);
            return -1;
        }
    }
    Py_XSETREF(self->metrics, Py_NewRef(metrics));
    Py_XSETREF(self->latency, latency);
    Py_XSETREF(self->replies, replies);
    Py_XSETREF(self->handlers, Py_NewRef(handlers));
    Py_XSETREF(self->fallback, Py_NewRef(fallback));
    Py_XSETREF(self->outbox, Py_NewRef(outbox));
    Py_XSETREF(self->new_box, Py_NewRef(new_box));
    Py_XSETREF(self->request_type, Py_NewRef(request_type));
    Py_XSETREF(self->cancelled, Py_NewRef(cancelled));
    Py_XSETREF(self->zero_copy, Py_XNewRef(zero_copy));
    Py_XSETREF(self->kept, Py_XNewRef(kept));
    self->fallback_zero_copy = fallback_zero_copy;
    if (self->toreadonly_name == NULL && (self->toreadonly_name = PyUnicode_InternFromString("toreadonly")) == NULL)
        return -1;
    if (self->release_name == NULL && (self->release_name = PyUnicode_InternFromString("release")) == NULL) return -1;
    if (self->closed_name == NULL && (self->closed_name = PyUnicode_InternFromString("closed")) == NULL) return -1;
    if (self->id_name == NULL && (self->id_name = PyUnicode_InternFromString("id")) == NULL) return -1;
    if (self->observe_name == NULL && (self->observe_name = PyUnicode_InternFromString("observe")) == NULL)
        return -1;
    if (self->reply_name == NULL && (self->reply_name = PyUnicode_InternFromString("reply")) == NULL) return -1;
    self->big_endian = big_endian;
    self->max_body = max_body;
    return 0;
}

static int runner_traverse(Runner *self, visitproc visit, void *arg) {
    Py_VISIT(self->handlers);
    Py_VISIT(self->fallback);
    Py_VISIT(self->outbox);
    Py_VISIT(self->new_box);
    Py_VISIT(self->request_type);
    Py_VISIT(self->cancelled);
    Py_VISIT(self->metrics);
    Py_VISIT(self->latency);
    Py_VISIT(self->replies);
    Py_VISIT(self->zero_copy);
    Py_VISIT(self->kept);
    return 0;
}

static int runner_clear(Runner *self) {
    Py_CLEAR(self->handlers);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->outbox);
    Py_CLEAR(self->new_box);
    Py_CLEAR(self->request_type);
    Py_CLEAR(self->cancelled);
    Py_CLEAR(self->metrics);
    Py_CLEAR(self->latency);
    Py_CLEAR(self->replies);
    Py_CLEAR(self->zero_copy);
    Py_CLEAR(self->kept);
    Py_CLEAR(self->toreadonly_name);
    Py_CLEAR(self->release_name);
    Py_CLEAR(self->closed_name);
    Py_CLEAR(self->id_name);
    Py_CLEAR(self->observe_name);
    Py_CLEAR(self->reply_name);
    return 0;
}

static void runner_dealloc(Runner *self) {
    PyObject_GC_UnTrack(self);
    runner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* list[index] += amount (an int or a float). */
static int list_add(PyObject *list, Py_ssize_t index, PyObject *amount) {
    PyObject *sum = PyNumber_Add(PyList_GET_ITEM(list, index), amount);
    if (sum == NULL) return -1;
    PyList_SetItem(list, index, sum); /* steals sum */
    return 0;
}

/* box[index] += amount */
static int box_add(PyObject *box, Py_ssize_t index, Py_ssize_t amount) {
    PyObject *amount_obj = PyLong_FromSsize_t(amount);
    if (amount_obj == NULL) return -1;
    int failed = list_add(box, index, amount_obj);
    Py_DECREF(amount_obj);
    return failed;
}

/* The connection's box (made by new_box if it has none yet): borrowed. */
static PyObject *get_box(Runner *self, PyObject *conn_id) {
    PyObject *box = PyDict_GetItemWithError(self->outbox, conn_id);
    if (box == NULL) {
        if (PyErr_Occurred()) return NULL;
        PyObject *made = PyObject_CallOneArg(self->new_box, conn_id);
        if (made == NULL) return NULL;
        Py_DECREF(made); /* the outbox holds it */
        box = PyDict_GetItemWithError(self->outbox, conn_id);
        if (box == NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "new_box did not add a box");
    }
    if (box != NULL && (!PyList_CheckExact(box) || PyList_GET_SIZE(box) < 2)) {
        PyErr_SetString(PyExc_TypeError, "a reply box is a list [size, acks, ...]");
        return NULL;
    }
    return box;
}

/* time.perf_counter() (CLOCK_MONOTONIC on Linux), what the Python loop reads. */
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* metrics.<name>(cmd, value); 0 or -1 with an exception set. */
static int record(Runner *self, PyObject *name, PyObject *cmd, PyObject *value) {
    if (value == NULL) return -1;
    PyObject *call_args[3] = {self->metrics, cmd, value};
    PyObject *result = PyObject_VectorcallMethod(name, call_args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(value);
    if (result == NULL) return -1;
    Py_DECREF(result);
    return 0;
}

/* The latency bucket of `seconds`: bisect_left(LATENCY_BUCKETS, seconds), as metrics.py. */
static Py_ssize_t bucket_of(double seconds) {
    Py_ssize_t lo = 0, hi = nbounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (bounds[mid] < seconds) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static PyObject *one;

/* metrics.observe(cmd, seconds), in C when cmd's histogram is there already. */
static int observe(Runner *self, PyObject *cmd, double seconds) {
    PyObject *counts = PyDict_GetItemWithError(self->latency, cmd); /* borrowed */
    if (counts == NULL && PyErr_Occurred()) return -1;
    if (counts == NULL || !PyList_CheckExact(counts) || PyList_GET_SIZE(counts) != nbounds + 2)
        return record(self, self->observe_name, cmd, PyFloat_FromDouble(seconds));
    PyObject *value = PyFloat_FromDouble(seconds);
    if (value == NULL) return -1;
    int failed = list_add(counts, bucket_of(seconds), one) < 0 || list_add(counts, nbounds + 1, value) < 0;
    Py_DECREF(value);
    return failed ? -1 : 0;
}

/* metrics.reply(cmd, 0), in C when that series is there already (cmd_obj: cmd as an int). */
static int count_reply(Runner *self, int cmd, PyObject *cmd_obj) {
    PyObject *key = PyLong_FromLongLong((long long)cmd << 32);
    if (key == NULL) return -1;
    PyObject *count = PyDict_GetItemWithError(self->replies, key); /* borrowed */
    if (count == NULL) {
        Py_DECREF(key);
        if (PyErr_Occurred()) return -1;
        return record(self, self->reply_name, cmd_obj, PyLong_FromLong(0));
    }
    PyObject *sum = PyNumber_Add(count, one);
    int failed = sum == NULL || PyDict_SetItem(self->replies, key, sum) < 0;
    Py_XDECREF(sum);
    Py_DECREF(key);
    return failed ? -1 : 0;
}

/* _inline.latency_bucket(seconds): bucket_of, for the tests. */
static PyObject *latency_bucket(PyObject *unused, PyObject *arg) {
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(bucket_of(seconds));
}

/* 1 if cmd's handler takes a memoryview body, 0 if bytes, -1 on error. */
static int wants_view(Runner *self, PyObject *cmd) {
    if (self->zero_copy == NULL || PySet_GET_SIZE(self->zero_copy) == 0) return 0;
    return PySet_Contains(self->zero_copy, cmd);
}

/* Whether a buffer is one flat run of bytes (format "B"), as sub_view needs. */
static int is_flat(const Py_buffer *buffer) {
    return buffer->ndim == 1 && buffer->itemsize == 1 && buffer->shape != NULL && buffer->suboffsets == NULL &&
           (buffer->strides == NULL || buffer->strides[0] == 1) && buffer->format != NULL &&
           strcmp(buffer->format, "B") == 0;
}

/* A flat read-only memoryview of `payload`, for the zero_copy bodies' sub_views: the
   payload itself when it is one already (a ring record read in place). */
static PyObject *readonly_view(Runner *self, PyObject *payload) {
    if (PyMemoryView_Check(payload) && PyMemoryView_GET_BUFFER(payload)->readonly &&
        is_flat(PyMemoryView_GET_BUFFER(payload)))
        return Py_NewRef(payload);
    PyObject *whole = PyMemoryView_FromObject(payload);
    if (whole != NULL && !is_flat(PyMemoryView_GET_BUFFER(whole))) /* any other C-contiguous buffer */
        Py_SETREF(whole, PyObject_CallMethod(whole, "cast", "s", "B"));
    if (whole != NULL && !PyMemoryView_GET_BUFFER(whole)->readonly)
        Py_SETREF(whole, PyObject_CallMethodNoArgs(whole, self->toreadonly_name));
    return whole;
}

/* whole[start:start + size] for a flat view `whole`, what slicing makes
   (memory_subscript: a view of the same managed buffer, its start and length moved)
   without a slice object and its index conversions. */
static PyObject *sub_view(PyObject *whole, Py_ssize_t start, Py_ssize_t size) {
    PyObject *view = PyMemoryView_FromObject(whole);
    if (view == NULL) return NULL;
    Py_buffer *buffer = PyMemoryView_GET_BUFFER(view);
    buffer->buf = (char *)buffer->buf + start;
    buffer->len = size;
    buffer->shape[0] = size;
    return view;
}

/* The byte size of a reply the loop packs itself (bytes, or a flat memoryview such as a
   zero_copy body), or -1 for anything Python answers (reply_parts). */
static Py_ssize_t flat_size(PyObject *result) {
    if (PyBytes_CheckExact(result)) return PyBytes_GET_SIZE(result);
    Py_ssize_t size = -1;
    Py_buffer buffer;
    if (PyMemoryView_Check(result)) {
        if (PyObject_GetBuffer(result, &buffer, PyBUF_FULL_RO) < 0) { /* released: Python says why */
            PyErr_Clear();
            return -1;
        }
        if (is_flat(&buffer)) size = buffer.len;
        PyBuffer_Release(&buffer);
    }
    return size;
}

/* (pos, ran, unusual); steals `unusual`, which is NULL after a failed build (error set). */
static PyObject *unusual_result(Py_ssize_t pos, Py_ssize_t ran, PyObject *unusual) {
    return unusual == NULL ? NULL : Py_BuildValue("(nnN)", pos, ran, unusual);
}

static PyObject *runner_run(Runner *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "run(conn, payload, pos)");
        return NULL;
    }
    if (self->handlers == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "InlineRunner not initialised");
        return NULL;
    }
    PyObject *conn = args[0];
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred()) return NULL;
    PyObject *conn_id = PyObject_GetAttr(conn, self->id_name);
    if (conn_id == NULL) return NULL;
    /* Held for the whole call: the buffer's owner cannot go away or change size. */
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(conn_id);
        return NULL;
    }
    PyObject *whole = NULL; /* a read-only memoryview of the payload, made for the first zero_copy body */
    PyObject *cmd_obj = NULL;
    const unsigned char *data = (const unsigned char *)view.buf;
    Py_ssize_t size = view.len;
    int big = self->big_endian;
    int timed = self->metrics != Py_None;
    /* As the Python loop: each request's time runs from the end of the previous one. */
    double started = timed ? now() : 0.0;
    Py_ssize_t ran = 0;
    PyObject *out = NULL;
    while (pos < size) {
        if (pos < 0 || size - pos < HEADER_SIZE) {
            PyErr_SetString(PyExc_ValueError, "request record ends inside a packet header");
            goto done;
        }
        const unsigned char *at = data + pos;
        uint32_t length = get_u32(at, big);
        uint32_t seq = get_u32(at + 4, big);
        uint16_t cmd = get_u16(at + 8, big);
        uint32_t status = get_u32(at + 10, big);
        uint32_t user = get_u32(at + 14, big);
        if (length < HEADER_SIZE || (Py_ssize_t)length > size - pos) {
            PyErr_SetString(PyExc_ValueError, "request record holds a packet with a bad length");
            goto done;
        }
        Py_XSETREF(cmd_obj, PyLong_FromLong(cmd)); /* the one int object for cmd in this packet */
        if (cmd_obj == NULL) goto done;
        PyObject *handler = PyDict_GetItemWithError(self->handlers, cmd_obj); /* borrowed */
        int want_view = handler != NULL;  /* for now: whether cmd has a handler of its own */
        if (handler == NULL) {
            if (PyErr_Occurred()) goto done;
            handler = self->fallback;
        }
        if (handler == Py_None) break; /* async, or no handler: a consumer task's job */
        Py_INCREF(handler);
        want_view = want_view ? wants_view(self, cmd_obj) : self->fallback_zero_copy;
        if (want_view < 0) {
            Py_DECREF(handler);
            goto done;
        }
        if (want_view && whole == NULL && (whole = readonly_view(self, args[1])) == NULL) {
            Py_DECREF(handler);
            goto done;
        }
        PyObject *body = want_view ? sub_view(whole, pos + HEADER_SIZE, length - HEADER_SIZE)
                                   : PyBytes_FromStringAndSize((const char *)at + HEADER_SIZE, length - HEADER_SIZE);
        PyObject *request_args[6] = {PyLong_FromUnsignedLong(seq), Py_NewRef(cmd_obj),
                                     PyLong_FromUnsignedLong(status), PyLong_FromUnsignedLong(user), body, conn};
        PyObject *request = NULL;
        if (request_args[0] && request_args[1] && request_args[2] && request_args[3] && body)
            request = PyObject_Vectorcall(self->request_type, request_args, 6, NULL);
        for (int i = 0; i < 4; i++) Py_XDECREF(request_args[i]);
        PyObject *result = NULL;
        if (request != NULL) {
            result = PyObject_CallOneArg(handler, request);
            Py_DECREF(request);
        }
        /* Bookkeeping that keeps the handler's exception, if it raised, for below: a
           view still held (the reply, or kept by the handler) goes to `kept`, Python's
           to release once the replies are copied out; and the request's latency. */
        int held = want_view && body != NULL && Py_REFCNT(body) > 1;
        if (held || timed) {
            PyObject *saved_type, *saved_value, *saved_traceback;
            PyErr_Fetch(&saved_type, &saved_value, &saved_traceback);
            int failed = held && PyList_Append(self->kept, body) < 0;
            if (!failed && timed) {
                double finished = now();
                failed = observe(self, cmd_obj, finished - started) < 0;
                started = finished;
            }
            if (failed) {
                Py_XDECREF(saved_type);
                Py_XDECREF(saved_value);
                Py_XDECREF(saved_traceback);
                Py_XDECREF(result);
                Py_XDECREF(body);
                Py_DECREF(handler);
                goto done;
            }
            PyErr_Restore(saved_type, saved_value, saved_traceback);
        }
        Py_XDECREF(body);
        pos += length;
        if (result == NULL) { /* the Request could not be built (MemoryError), or the handler raised */
            /* Exception and CancelledError are the handler's failure: Python answers
               them. Anything else (KeyboardInterrupt, SystemExit) propagates. */
            if (!PyErr_ExceptionMatches(PyExc_Exception) && !PyErr_ExceptionMatches(self->cancelled)) {
                Py_DECREF(handler);
                goto done;
            }
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            if (traceback != NULL) PyException_SetTraceback(value, traceback);
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            out = unusual_result(pos, ran, Py_BuildValue("(IiIOON)", seq, (int)cmd, user, handler, Py_None, value));
            Py_DECREF(handler);
            goto done;
        }
        int closed = 0;
        if (result != Py_None) {
            PyObject *closed_obj = PyObject_GetAttr(conn, self->closed_name);
            if (closed_obj == NULL) {
                Py_DECREF(result);
                Py_DECREF(handler);
                goto done;
            }
            closed = closed_obj != Py_False;
            Py_DECREF(closed_obj);
        }
        Py_ssize_t result_size = result == Py_None ? 0 : flat_size(result);
        if (result != Py_None && (result_size < 0 || result_size > self->max_body || closed)) {
            out = unusual_result(pos, ran, Py_BuildValue("(IiIONO)", seq, (int)cmd, user, handler, result, Py_None));
            Py_DECREF(handler);
            goto done;
        }
        Py_DECREF(handler);
        PyObject *box = get_box(self, conn_id);
        if (box == NULL) {
            Py_DECREF(result);
            goto done;
        }
        Py_INCREF(box); /* ours until the end of this packet, whatever happens to the outbox */
        if (result != Py_None) {
            Py_ssize_t reply_size = HEADER_SIZE + result_size;
            PyObject *header = PyBytes_FromStringAndSize(NULL, HEADER_SIZE);
            if (header == NULL) {
                Py_DECREF(box);
                Py_DECREF(result);
                goto done;
            }
            unsigned char *h = (unsigned char *)PyBytes_AS_STRING(header);
            put_u32(h, (uint32_t)reply_size, big);
            put_u32(h + 4, seq, big);
            put_u16(h + 8, cmd, big);
            put_u32(h + 10, 0, big);
            put_u32(h + 14, user, big);
            int failed = PyList_Append(box, header) < 0 || PyList_Append(box, result) < 0 ||
                         box_add(box, 0, reply_size) < 0;
            Py_DECREF(header);
            if (failed) {
                Py_DECREF(box);
                Py_DECREF(result);
                goto done;
            }
        }
        int sent = result != Py_None;
        Py_DECREF(result);
        int ack_failed = box_add(box, 1, 1) < 0;
        if (!ack_failed && sent && timed) ack_failed = count_reply(self, cmd, cmd_obj) < 0;
        Py_DECREF(box);
        if (ack_failed) goto done;
        ran += 1;
    }
    out = Py_BuildValue("(nnO)", pos, ran, Py_None);
done:
    Py_XDECREF(cmd_obj);
    Py_XDECREF(whole);
    PyBuffer_Release(&view);
    Py_DECREF(conn_id);
    return out;
}

/* release_kept() -> int: release every view in `kept` that something besides the list
   still holds, empty the list, and return how many could not be released (a buffer of
   them is exported). The twin of dispatcher.release_views. */
static PyObject *runner_release_kept(Runner *self, PyObject *unused) {
    if (self->kept == NULL) return PyLong_FromLong(0);
    Py_ssize_t held = 0;
    PyObject *kept = Py_NewRef(self->kept);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(kept); i++) {
        PyObject *view = PyList_GET_ITEM(kept, i);
        if (Py_REFCNT(view) == 1) continue; /* the list's alone: it goes with the list */
        Py_INCREF(view);
        PyObject *done = PyObject_CallMethodNoArgs(view, self->release_name);
        Py_DECREF(view);
        if (done != NULL) {
            Py_DECREF(done);
        } else if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            held++;
        } else {
            Py_DECREF(kept);
            return NULL;
        }
    }
    int failed = PyList_SetSlice(kept, 0, PyList_GET_SIZE(kept), NULL);
    Py_DECREF(kept);
    return failed ? NULL : PyLong_FromSsize_t(held);
}

static PyMethodDef runner_methods[] = {
    {"run", (PyCFunction)(void (*)(void))runner_run, METH_FASTCALL,
     "run(conn, payload, pos) -> (pos, ran, unusual); see the module comment."},
    {"release_kept", (PyCFunction)runner_release_kept, METH_NOARGS,
     "Release the zero_copy body views still held; returns how many had a buffer exported."},
    {NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "aserver.worker._inline.InlineRunner",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The worker's inline loop for the common case (see Dispatcher._run_inline).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)runner_init,
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_traverse = (traverseproc)runner_traverse,
    .tp_clear = (inquiry)runner_clear,
    .tp_methods = runner_methods,
};

static PyMethodDef module_functions[] = {
    {"latency_bucket", (PyCFunction)latency_bucket, METH_O,
     "The latency bucket the C loop counts `seconds` in (bisect_left on LATENCY_BUCKETS)."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aserver.worker._inline",
    .m_doc = "The worker's inline loop in C.",
    .m_size = -1,
    .m_methods = module_functions,
};

/* The latency bounds from aserver.metrics, so both loops count alike. */
static int take_bounds(void) {
    PyObject *metrics = PyImport_ImportModule("aserver.metrics");
    PyObject *tuple = metrics ? PyObject_GetAttrString(metrics, "LATENCY_BUCKETS") : NULL;
    Py_XDECREF(metrics);
    if (tuple == NULL) return -1;
    PyObject *seq = PySequence_Fast(tuple, "LATENCY_BUCKETS must be a sequence");
    Py_DECREF(tuple);
    if (seq == NULL) return -1;
    nbounds = PySequence_Fast_GET_SIZE(seq);
    int failed = nbounds > MAX_BOUNDS;
    if (failed) PyErr_SetString(PyExc_ValueError, "too many LATENCY_BUCKETS");
    for (Py_ssize_t i = 0; !failed && i < nbounds; i++) {
        bounds[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        failed = bounds[i] == -1.0 && PyErr_Occurred();
    }
    Py_DECREF(seq);
    return failed ? -1 : 0;
}

PyMODINIT_FUNC PyInit__inline(void) {
    if (take_bounds() < 0) { /* an ImportError, so aserver.native falls back to Python */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_Format(PyExc_ImportError, "aserver.metrics.LATENCY_BUCKETS unusable in C: %S", value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return NULL;
    }
    if (PyType_Ready(&RunnerType) < 0 || (one = PyLong_FromLong(1)) == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RunnerType);
    if (PyModule_AddIntConstant(m, "ABI", INLINE_ABI) < 0 ||
        PyModule_AddObject(m, "InlineRunner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
