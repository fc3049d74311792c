/* Compiled frame-run scanner for the proxy's hot path (optional; amqproxy/amqp/scan.py holds
 * the pure-Python twin with the same contract, and tests/unit/test_scan.py checks both agree).
 *
 * Both functions walk complete frames of one channel from `pos` and return where the run stops:
 * at the first frame that is incomplete, oversized, badly terminated, on another channel or of a
 * kind the caller must look at itself. They never raise on bad input: the caller's Python path
 * re-reads the frame at the stop position and produces the right AMQP error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FRAME_METHOD 1
#define FRAME_HEADER 2
#define FRAME_BODY 3
#define FRAME_END 0xCE

#define BASIC_PUBLISH 0x003C0028u
#define BASIC_DELIVER 0x003C003Cu
#define BASIC_ACK 0x003C0050u
#define BASIC_REJECT 0x003C005Au
#define BASIC_NACK 0x003C0078u
#define ACK_SIZE 13 /* class, method, delivery tag, bits */

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* One complete frame of `channel` at `p`: its payload size, or -1. */
static inline Py_ssize_t frame_at(const unsigned char *b, Py_ssize_t n, Py_ssize_t p,
                                  unsigned channel, uint32_t max_size, int *type) {
    if (n - p < 8)
        return -1;
    uint32_t size = be32(b + p + 3);
    if (size > max_size || ((unsigned)b[p + 1] << 8 | b[p + 2]) != channel)
        return -1;
    if ((Py_ssize_t)size >= n - p - 7 || b[p + 7 + size] != FRAME_END)
        return -1;
    *type = b[p];
    return (Py_ssize_t)size;
}

/* The "moved" result of a run: None (a new reference) when the frames b[from:to] go out as
 * they are, else a copy with every channel id set to to_channel and, when offset is not 0,
 * every Basic.Ack tag lowered by offset, and without the Basic.Ack frames when drop_acks;
 * NULL with an exception set. */
static PyObject *moved_run(const unsigned char *b, Py_ssize_t from, Py_ssize_t to,
                           unsigned channel, unsigned to_channel, long long offset,
                           Py_ssize_t dropped) {
    if (to <= from || (to_channel == channel && offset == 0 && dropped == 0))
        Py_RETURN_NONE;
    PyObject *moved = PyBytes_FromStringAndSize(NULL, to - from - dropped);
    if (moved == NULL)
        return NULL;
    unsigned char *m = (unsigned char *)PyBytes_AS_STRING(moved);
    Py_ssize_t out = 0;
    for (Py_ssize_t p = from; p < to;) {
        Py_ssize_t len = (Py_ssize_t)be32(b + p + 3) + 8;
        int is_ack = b[p] == FRAME_METHOD && be32(b + p + 7) == BASIC_ACK;
        if (is_ack && dropped) {
            p += len;
            continue;
        }
        memcpy(m + out, b + p, (size_t)len);
        m[out + 1] = (unsigned char)(to_channel >> 8);
        m[out + 2] = (unsigned char)to_channel;
        if (offset && is_ack) {
            uint64_t tag = be64(m + out + 11) - (uint64_t)offset;
            for (int k = 7; k >= 0; k--, tag >>= 8)
                m[out + 11 + k] = (unsigned char)tag;
        }
        out += len;
        p += len;
    }
    return moved;
}

/* broker_run(data, pos, channel, max_size, deliver_ok, confirmed, offset, to_channel,
 *            drop_acks) -> (stop, deliveries, confirmed, moved)
 * Broker to client: content frames; Basic.Deliver when deliver_ok; Basic.Ack (publisher
 * confirms) when confirmed >= 0, in order only (multiple, or the tag right after `confirmed`)
 * and above `offset`, `confirmed` following the acks. `moved` is None when the frames go out
 * as they are, else a copy of data[pos:stop] with every channel id set to to_channel and every
 * ack tag lowered by offset (the client's numbering); with drop_acks the acks are counted but
 * left out of the copy (confirms the proxy takes for itself: the client did not ask). */
static PyObject *broker_run(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos;
    unsigned int channel, max_size, to_channel;
    int deliver_ok, drop_acks;
    long long confirmed, offset;
    if (!PyArg_ParseTuple(args, "y*nIIpLLIp", &buf, &pos, &channel, &max_size, &deliver_ok,
                          &confirmed, &offset, &to_channel, &drop_acks))
        return NULL;
    const unsigned char *b = buf.buf;
    Py_ssize_t n = buf.len, deliveries = 0, start = pos, dropped = 0;
    if (pos < 0)
        pos = start = n;
    while (1) {
        int type;
        Py_ssize_t size = frame_at(b, n, pos, channel, max_size, &type);
        if (size < 0)
            break;
        if (type == FRAME_METHOD) {
            uint32_t mid = size >= 4 ? be32(b + pos + 7) : 0;
            if (mid == BASIC_DELIVER && deliver_ok) {
                deliveries++;
            } else if (mid == BASIC_ACK && confirmed >= 0 && size >= 13) {
                long long tag = (long long)be64(b + pos + 11);
                int multiple = b[pos + 19] & 1;
                if (tag <= offset || tag < 0 || !(multiple || tag == confirmed + 1))
                    break;
                if (tag > confirmed)
                    confirmed = tag;
                if (drop_acks)
                    dropped += size + 8;
            } else {
                break;
            }
        } else if (type != FRAME_HEADER && type != FRAME_BODY) {
            break;
        }
        pos += size + 8;
    }
    PyObject *moved = moved_run(b, start, pos, channel, to_channel, offset, dropped);
    PyBuffer_Release(&buf);
    if (moved == NULL)
        return NULL;
    return Py_BuildValue("nnLN", pos, deliveries, confirmed, moved);
}

/* Where the flags octet of a Basic.Publish payload lies, or -1 unless the arguments are
 * exactly ticket, exchange, routing key and that octet (anything else the broker cannot
 * decode: the caller's full check answers it). */
static Py_ssize_t publish_flags_at(const unsigned char *b, Py_ssize_t start, Py_ssize_t end) {
    Py_ssize_t at = start + 6; /* class, method, reserved ticket */
    if (at >= end)
        return -1;
    at += 1 + b[at]; /* exchange */
    if (at >= end)
        return -1;
    at += 1 + b[at]; /* routing key */
    return at == end - 1 ? at : -1;
}

#define MAX_TABLE_DEPTH 32 /* amqp/methods.py MAX_TABLE_DEPTH: the same bound */

/* The size of a fixed-size field value of type `kind`, -1 for a length-prefixed one (S, A, F,
 * x), -2 for a type the broker does not know. */
static inline int field_size(unsigned char kind) {
    switch (kind) {
    case 'V': return 0;
    case 't': case 'b': case 'B': return 1;
    case 's': case 'u': return 2;
    case 'I': case 'i': case 'f': return 4;
    case 'D': return 5;
    case 'l': case 'L': case 'd': case 'T': return 8;
    case 'S': case 'A': case 'F': case 'x': return -1;
    default: return -2;
    }
}

/* 1 when b[pos:end] is the content of a well-formed field table (arrays inside hold values
 * without names) nested at most MAX_TABLE_DEPTH deep; depth first with an explicit stack, as
 * methods.table_error does. */
static int table_ok(const unsigned char *b, Py_ssize_t pos, Py_ssize_t end) {
    Py_ssize_t stack_pos[MAX_TABLE_DEPTH], stack_end[MAX_TABLE_DEPTH];
    int stack_array[MAX_TABLE_DEPTH], depth = 0, is_array = 0;
    while (1) {
        if (pos >= end) {
            if (pos > end)
                return 0;
            if (depth == 0)
                return 1;
            depth--;
            pos = stack_pos[depth], end = stack_end[depth], is_array = stack_array[depth];
            continue;
        }
        if (!is_array) {
            pos += 1 + b[pos];
            if (pos >= end)
                return 0;
        }
        unsigned char kind = b[pos++];
        int size = field_size(kind);
        if (size == -2)
            return 0;
        if (size >= 0) {
            pos += size;
            continue;
        }
        if (pos + 4 > end)
            return 0;
        Py_ssize_t inner = pos + 4;
        pos = inner + (Py_ssize_t)be32(b + inner - 4);
        if (pos > end)
            return 0;
        if (kind == 'F' || kind == 'A') {
            if (depth + 1 >= MAX_TABLE_DEPTH)
                return 0;
            stack_pos[depth] = pos, stack_end[depth] = end, stack_array[depth] = is_array;
            depth++;
            end = pos, pos = inner, is_array = kind == 'A';
        }
    }
}

/* 1 when the content header payload b[start:end] is what the broker decodes: class 60,
 * weight 0, only Basic's 14 property flags, the properties exactly (methods.py
 * content_header_error is the same check with the broker's texts). */
static int header_ok(const unsigned char *b, Py_ssize_t start, Py_ssize_t end) {
    static const char kinds[14] = {'s', 's', 'F', 'o', 'o', 's', 's', 's', 's', 'l', 's', 's',
                                   's', 's'};
    if (end - start < 14 || b[start] != 0 || b[start + 1] != 60 || b[start + 2] || b[start + 3])
        return 0;
    unsigned flags = (unsigned)b[start + 12] << 8 | b[start + 13];
    if (flags & 3)
        return 0;
    Py_ssize_t pos = start + 14;
    for (int i = 0; i < 14; i++) {
        if (!(flags & (0x8000u >> i)))
            continue;
        if (pos >= end)
            return 0;
        switch (kinds[i]) {
        case 's': pos += 1 + b[pos]; break;
        case 'o': pos += 1; break;
        case 'l': pos += 8; break;
        default: {
            if (pos + 4 > end)
                return 0;
            Py_ssize_t stop = pos + 4 + (Py_ssize_t)be32(b + pos);
            if (stop > end || !table_ok(b, pos + 4, stop))
                return 0;
            pos = stop;
        }
        }
        if (pos > end)
            return 0;
    }
    return pos == end;
}

/* Client to broker, from a message boundary: whole messages of Basic.Publish without the
 * mandatory/immediate flags (method, header, bodies adding up to the header's size), and
 * Basic.Ack/Nack/Reject of the exact size when acks_ok. Stops before a message that is not complete here.
 * Returns the stop position; *publishes counts the messages walked. */
static Py_ssize_t walk_client(const unsigned char *b, Py_ssize_t n, Py_ssize_t pos,
                              unsigned channel, uint32_t max_size, int acks_ok,
                              Py_ssize_t *publishes) {
    *publishes = 0;
    if (pos < 0)
        return n;
    while (1) {
        int type;
        Py_ssize_t size = frame_at(b, n, pos, channel, max_size, &type);
        if (size < 4 || type != FRAME_METHOD)
            break;
        uint32_t mid = be32(b + pos + 7);
        Py_ssize_t next = pos + size + 8;
        if (mid == BASIC_ACK || mid == BASIC_NACK || mid == BASIC_REJECT) {
            if (!acks_ok || size != ACK_SIZE) /* a 64-bit tag and one octet of bits */
                break;
            pos = next;
            continue;
        }
        if (mid != BASIC_PUBLISH)
            break;
        Py_ssize_t flags = publish_flags_at(b, pos + 7, pos + 7 + size);
        if (flags < 0 || b[flags] != 0)
            break;
        /* the content header, then bodies up to its size */
        Py_ssize_t hsize = frame_at(b, n, next, channel, max_size, &type);
        if (hsize < 14 || type != FRAME_HEADER || !header_ok(b, next + 7, next + 7 + hsize))
            break;
        uint64_t remaining = be64(b + next + 11);
        next += hsize + 8;
        while (remaining) {
            Py_ssize_t bsize = frame_at(b, n, next, channel, max_size, &type);
            if (bsize < 0 || type != FRAME_BODY || (uint64_t)bsize > remaining)
                break;
            remaining -= (uint64_t)bsize;
            next += bsize + 8;
        }
        if (remaining)
            break;
        (*publishes)++;
        pos = next;
    }
    return pos;
}

/* client_run(data, pos, channel, max_size, acks_ok, to_channel) -> (stop, publishes, moved)
 * `moved` is None when to_channel is the channel (the frames go up as they are), else a copy of
 * data[pos:stop] with every channel id set to to_channel. */
static PyObject *client_run(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, publishes;
    unsigned int channel, max_size, to_channel;
    int acks_ok;
    if (!PyArg_ParseTuple(args, "y*nIIpI", &buf, &pos, &channel, &max_size, &acks_ok,
                          &to_channel))
        return NULL;
    const unsigned char *b = buf.buf;
    if (pos < 0) /* not a position the proxy passes; keep any copy inside the buffer */
        pos = buf.len;
    Py_ssize_t stop = walk_client(b, buf.len, pos, channel, max_size, acks_ok, &publishes);
    PyObject *moved = moved_run(b, pos, stop, channel, to_channel, 0, 0);
    PyBuffer_Release(&buf);
    if (moved == NULL)
        return NULL;
    return Py_BuildValue("nnN", stop, publishes, moved);
}

static PyMethodDef methods[] = {
    {"broker_run", broker_run, METH_VARARGS,
     "broker_run(data, pos, channel, max_size, deliver_ok, confirmed, offset, to_channel, "
     "drop_acks) -> (stop, deliveries, confirmed, moved or None)"},
    {"client_run", client_run, METH_VARARGS,
     "client_run(data, pos, channel, max_size, acks_ok, to_channel) -> "
     "(stop, publishes, moved or None)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "amqproxy.amqp._scan",
    "Compiled frame-run scanner (see amqproxy.amqp.scan).", -1, methods,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
