/* media._fast: the C twin of two hot spots of the receive path.
 *
 * 1. recv(fd, lanes, now, out, max_packets): batched UDP receive (Linux recvmmsg(2)) on the
 *    shared RTP port with the in-order fast path of media.ingest.RtpIngest.feed. A datagram
 *    that is a plain RTP packet (RFC 3550 5.1: V=2, no padding, extension or CSRC) of an armed
 *    Lane, with the lane's SSRC, the very next sequence number and the open frame's timestamp
 *    (or none open), has its payload appended to the lane's chunk list (the assembler's open
 *    frame) and is counted in the lane, with no Python code run for it. Everything else keeps
 *    its order through Python: `out` receives, in arrival order,
 *      - a Lane, when a packet with the marker bit completed that lane's frame (the lane is
 *        then disarmed until Python re-arms it), or
 *      - a (datagram bytes, address) tuple for any other datagram (after which its lane, if
 *        any, is disarmed, so the lane's later packets of the batch follow it through Python).
 *    Returns the number of packets taken by the fast path.
 *
 * 2. nal_spans(au): (start, end) of each NAL unit of an Annex-B access unit (H.264 / H.265
 *    Annex B.2): the same result as media.nal.nal_spans, found with memchr.
 *
 * The pure-Python twins are used when this module is missing; tests compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 64
#define SLOT (64 * 1024) /* a UDP datagram is at most 65,507 bytes */

/* ---------------------------------------------------------------- Lane */

typedef struct {
    PyObject_HEAD
    int armed;
    int seq;                 /* the sequence number taken next */
    long long ts;            /* timestamp of the open frame, -1 if none is open */
    long long first_seq;     /* sequence number that opened the frame here, -1 if not here */
    Py_ssize_t room;         /* payload bytes the open frame may still take */
    unsigned int ssrc;       /* the SSRC being received */
    PyObject *chunks;        /* list: the open frame's payloads */
    PyObject *owner;         /* whatever Python wants back with the lane (its stream) */
    long long run;           /* packets taken since Python last took them over */
    long long nbytes;        /* their datagram bytes */
    double last_at;          /* `now` of the last packet taken */
    long long total;         /* packets taken here, ever */
} Lane;

static int Lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->chunks);
    Py_VISIT(self->owner);
    return 0;
}

static int Lane_clear(Lane *self) {
    Py_CLEAR(self->chunks);
    Py_CLEAR(self->owner);
    return 0;
}

static void Lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    Lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"owner", NULL};
    PyObject *owner = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &owner)) return -1;
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    self->armed = 0;
    self->seq = 0;
    self->ts = -1;
    self->first_seq = -1;
    self->room = 0;
    self->ssrc = 0;
    self->run = 0;
    self->nbytes = 0;
    self->last_at = 0.0;
    self->total = 0;
    return 0;
}

static PyMemberDef Lane_members[] = {
    {"armed", T_INT, offsetof(Lane, armed), 0, "1 while the fast path may take packets"},
    {"seq", T_INT, offsetof(Lane, seq), 0, "the sequence number taken next"},
    {"ts", T_LONGLONG, offsetof(Lane, ts), 0, "timestamp of the open frame, -1 if none"},
    {"first_seq", T_LONGLONG, offsetof(Lane, first_seq), 0, "sequence number that opened the frame here, or -1"},
    {"room", T_PYSSIZET, offsetof(Lane, room), 0, "payload bytes the open frame may still take"},
    {"ssrc", T_UINT, offsetof(Lane, ssrc), 0, "the SSRC being received"},
    {"chunks", T_OBJECT, offsetof(Lane, chunks), 0, "list of the open frame's payloads"},
    {"owner", T_OBJECT, offsetof(Lane, owner), 0, "the lane's stream"},
    {"run", T_LONGLONG, offsetof(Lane, run), 0, "packets taken since Python took them over"},
    {"nbytes", T_LONGLONG, offsetof(Lane, nbytes), 0, "datagram bytes of those packets"},
    {"last_at", T_DOUBLE, offsetof(Lane, last_at), 0, "`now` of the last packet taken"},
    {"total", T_LONGLONG, offsetof(Lane, total), READONLY, "packets taken by the fast path, ever"},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._fast.Lane",
    .tp_doc = "One stream's in-order fast path state, shared with media.ingest.RtpIngest.",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_members = Lane_members,
};

/* ---------------------------------------------------------------- recv */

static unsigned char *g_buf = NULL; /* BATCH slots of SLOT bytes, allocated on first use */

static PyObject *make_address(const struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        if (!inet_ntop(AF_INET, &a->sin_addr, host, sizeof host)) host[0] = 0;
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        if (!inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host)) host[0] = 0;
        return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port), (unsigned int)ntohl(a->sin6_flowinfo),
                             (unsigned int)a->sin6_scope_id);
    }
    return Py_BuildValue("(si)", "", 0);
}

/* One datagram for Python, in order. */
static int emit_datagram(PyObject *out, const unsigned char *p, Py_ssize_t n, const struct sockaddr_storage *ss) {
    PyObject *data = PyBytes_FromStringAndSize((const char *)p, n);
    if (!data) return -1;
    PyObject *addr = make_address(ss);
    if (!addr) {
        Py_DECREF(data);
        return -1;
    }
    PyObject *item = PyTuple_Pack(2, data, addr);
    Py_DECREF(data);
    Py_DECREF(addr);
    if (!item) return -1;
    int rc = PyList_Append(out, item);
    Py_DECREF(item);
    return rc;
}

/* 1 taken, 0 not for the fast path, -1 error. */
static int take(Lane *lane, const unsigned char *p, Py_ssize_t n, unsigned int ssrc, double now, PyObject *out) {
    int seq = (p[2] << 8) | p[3];
    long long ts = ((long long)p[4] << 24) | (p[5] << 16) | (p[6] << 8) | p[7];
    if (seq != lane->seq || ssrc != lane->ssrc || (ts != lane->ts && lane->ts >= 0)) return 0;
    Py_ssize_t room = lane->room - (n - 12);
    if (room < 0 || lane->chunks == NULL || !PyList_CheckExact(lane->chunks)) return 0;
    PyObject *payload = PyBytes_FromStringAndSize((const char *)p + 12, n - 12);
    if (!payload) return -1;
    int rc = PyList_Append(lane->chunks, payload);
    Py_DECREF(payload);
    if (rc < 0) return -1;
    lane->room = room;
    lane->seq = (seq + 1) & 0xFFFF;
    lane->run += 1;
    lane->nbytes += n;
    lane->last_at = now;
    lane->total += 1;
    if (lane->ts < 0) {
        lane->ts = ts;
        lane->first_seq = seq;
    }
    if (p[1] & 0x80) { /* marker: the frame is complete */
        lane->armed = 0;
        if (PyList_Append(out, (PyObject *)lane) < 0) return -1;
    }
    return 1;
}

static PyObject *fast_recv(PyObject *module, PyObject *args) {
    int fd;
    PyObject *lanes, *out;
    double now;
    Py_ssize_t max_packets;
    if (!PyArg_ParseTuple(args, "iO!dO!n", &fd, &PyDict_Type, &lanes, &now, &PyList_Type, &out, &max_packets))
        return NULL;
    if (g_buf == NULL) {
        g_buf = PyMem_RawMalloc((size_t)BATCH * SLOT);
        if (g_buf == NULL) return PyErr_NoMemory();
    }
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_storage addrs[BATCH];
    Py_ssize_t taken = 0, seen = 0;
    while (seen < max_packets) {
        int want = BATCH;
        if (max_packets - seen < want) want = (int)(max_packets - seen);
        for (int i = 0; i < want; i++) {
            iov[i].iov_base = g_buf + (size_t)i * SLOT;
            iov[i].iov_len = SLOT;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
        }
        int got = recvmmsg(fd, msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) break;
            if (seen == 0) return PyErr_SetFromErrno(PyExc_OSError);
            break; /* reported on the next call */
        }
        for (int i = 0; i < got; i++) {
            const unsigned char *p = g_buf + (size_t)i * SLOT;
            Py_ssize_t n = (Py_ssize_t)msgs[i].msg_len;
            if (n > 12 && p[0] == 0x80 && !(p[1] >= 192 && p[1] <= 223)) {
                unsigned int ssrc = ((unsigned int)p[8] << 24) | (p[9] << 16) | (p[10] << 8) | p[11];
                PyObject *key = PyLong_FromUnsignedLong(ssrc);
                if (!key) return NULL;
                PyObject *found = PyDict_GetItemWithError(lanes, key); /* borrowed */
                Py_DECREF(key);
                if (found == NULL && PyErr_Occurred()) return NULL;
                if (found != NULL && Py_IS_TYPE(found, &LaneType)) {
                    Lane *lane = (Lane *)found;
                    /* held while in use: an allocation may run the GC, whose finalizers run Python */
                    Py_INCREF(lane);
                    int rc = 0;
                    if (lane->armed) {
                        rc = take(lane, p, n, ssrc, now, out);
                        if (rc == 0) lane->armed = 0; /* its later packets follow this one through Python */
                    }
                    Py_DECREF(lane);
                    if (rc < 0) return NULL;
                    if (rc > 0) {
                        taken++;
                        continue;
                    }
                }
            }
            if (emit_datagram(out, p, n, &addrs[i]) < 0) return NULL;
        }
        seen += got;
        if (got < want) break;
    }
    return PyLong_FromSsize_t(taken);
}

/* ---------------------------------------------------------------- nal_spans */

/* Append (start, e) with the zero bytes before e stripped (a NAL unit cannot end in 0x00),
 * unless nothing is left. */
static int add_span(PyObject *spans, const unsigned char *b, Py_ssize_t start, Py_ssize_t e) {
    while (e > start && b[e - 1] == 0) e--;
    if (e <= start) return 0;
    PyObject *t = Py_BuildValue("(nn)", start, e);
    if (!t) return -1;
    int rc = PyList_Append(spans, t);
    Py_DECREF(t);
    return rc;
}

static PyObject *fast_nal_spans(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *b = view.buf;
    Py_ssize_t len = view.len;
    PyObject *spans = PyList_New(0);
    if (!spans) goto fail;
    Py_ssize_t start = -1, i = 2;
    while (i < len) {
        const unsigned char *q = memchr(b + i, 1, (size_t)(len - i));
        if (q == NULL) break;
        Py_ssize_t k = q - b; /* the 01 byte */
        i = k + 1;
        if (b[k - 1] != 0 || b[k - 2] != 0) continue;
        /* the unit before ends where this start code (and a 4-byte one's zero_byte) begins */
        if (start >= 0 && add_span(spans, b, start, k - 2) < 0) goto fail;
        start = k + 1;
    }
    /* the last unit, less any trailing_zero_8bits */
    if (start >= 0 && add_span(spans, b, start, len) < 0) goto fail;
    PyBuffer_Release(&view);
    return spans;
fail:
    Py_XDECREF(spans);
    PyBuffer_Release(&view);
    return NULL;
}

/* ---------------------------------------------------------------- module */

static PyMethodDef methods[] = {
    {"recv", fast_recv, METH_VARARGS,
     "recv(fd, lanes, now, out, max_packets) -> packets taken by the fast path (see the module source)"},
    {"nal_spans", fast_nal_spans, METH_O, "(start, end) of each NAL unit of an Annex-B access unit"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "media._fast", "C twins of the receive path's hot spots (see media.receiver).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fast(void) {
    if (PyType_Ready(&LaneType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "BATCH", BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
