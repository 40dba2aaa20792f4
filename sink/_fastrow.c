/* sink/rows.py's fast_row, compiled: the same row, about ten times faster.

   It accepts an interaction only where the Python fast_row (its reference,
   sink/rows.py) accepts it, and builds the same FastRow byte for byte; for
   anything else it answers None, and the Python fast_row decides. It never
   refuses on its own, so a layout it does not know costs one quick look and
   changes nothing: tests/sink/test_fastrow.py holds the two to the same
   answers on generated and mangled events.

   What it takes: encode's layout, exactly (sink/rows.py's _CANONICAL), with
   flat metadata of distinct keys (_FLAT_METADATA), an event time whose
   microseconds fit a double exactly, and a record timestamp between 0 and
   2**52 ms (or none, -1). The numbers (lengths, bounds, types) come from
   the contract through configure(); the slug and text character classes
   are spelled out below and checked against the contract's patterns by the
   tests. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyTypeObject *row_type = NULL; /* FastRow, a tuple subclass */
static PyObject *kind = NULL;         /* "interaction" */
static PyObject *types = NULL;        /* the interaction types, bytes */
static Py_ssize_t user_id_max, source_max, slug_max, event_max_bytes;
static long long past_bound_ms, future_bound_ms;
static int configured = 0;

#define MAX_KEYS 64
#define EPOCH_2000_US 946684800000000LL
#define EXACT_DOUBLE (1LL << 53)

typedef struct {
    const unsigned char *p, *end;
} cursor;

static int literal(cursor *c, const char *text) {
    size_t n = strlen(text);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, text, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

/* _TEXT's classes: [!#-\[\]-~] first, then [ !#-\[\]-~] */
static int text_first(unsigned char ch) {
    return ch == 0x21 || (ch >= 0x23 && ch <= 0x5b) || (ch >= 0x5d && ch <= 0x7e);
}
static int text_rest(unsigned char ch) { return ch == 0x20 || text_first(ch); }
static int hex(unsigned char ch) { return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'); }
static int is_digit(unsigned char ch) { return ch >= '0' && ch <= '9'; }
static int slug_alnum(unsigned char ch) { return (ch >= 'a' && ch <= 'z') || is_digit(ch); }

/* "text": 1 to max characters of _TEXT, then '"'; its start and length */
static int text(cursor *c, Py_ssize_t max, const unsigned char **start, Py_ssize_t *len) {
    const unsigned char *p = c->p;
    if (p >= c->end || !text_first(*p))
        return 0;
    p++;
    while (p < c->end && text_rest(*p))
        p++;
    if (p >= c->end || *p != '"' || p - c->p > max)
        return 0;
    *start = c->p;
    *len = p - c->p;
    c->p = p + 1;
    return 1;
}

/* SLUG_PATTERN, ^[a-z0-9]+(?:[-_][a-z0-9]+)*$, at most slug_max, then '"' */
static int slug(cursor *c, const unsigned char **start, Py_ssize_t *len) {
    const unsigned char *p = c->p;
    int after_separator = 1;
    while (p < c->end && *p != '"') {
        if (slug_alnum(*p))
            after_separator = 0;
        else if ((*p == '-' || *p == '_') && !after_separator)
            after_separator = 1;
        else
            return 0;
        p++;
    }
    if (p >= c->end || p == c->p || after_separator || p - c->p > slug_max)
        return 0;
    *start = c->p;
    *len = p - c->p;
    c->p = p + 1;
    return 1;
}

static int uuid7(const unsigned char *p) {
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (p[i] != '-')
                return 0;
        } else if (!hex(p[i]))
            return 0;
    }
    return p[14] == '7' && (p[19] == '8' || p[19] == '9' || p[19] == 'a' || p[19] == 'b');
}

static int number(const unsigned char *p, int n) {
    int v = 0;
    for (int i = 0; i < n; i++)
        v = v * 10 + (p[i] - '0');
    return v;
}

/* "YYYY-MM-DDTHH:MM:SS" (digits checked): seconds since the epoch, as
   datetime.fromisoformat(... + "+00:00").timestamp(); 0 if no real date
   and time of day (years 1-9999, as datetime) */
static int epoch_second(const unsigned char *p, long long *out) {
    int y = number(p, 4), m = number(p + 5, 2), d = number(p + 8, 2);
    int hh = number(p + 11, 2), mm = number(p + 14, 2), ss = number(p + 17, 2);
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || m < 1 || m > 12 || d < 1 || hh > 23 || mm > 59 || ss > 59)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > days[m - 1] + (m == 2 && leap))
        return 0;
    /* days from civil (H. Hinnant's algorithm) */
    long long yy = m <= 2 ? y - 1 : y;
    long long era = (yy >= 0 ? yy : yy - 399) / 400;
    long long yoe = yy - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    long long day = era * 146097 + doe - 719468;
    *out = day * 86400 + hh * 3600 + mm * 60 + ss;
    return 1;
}

/* _FLAT_METADATA's value: 0 | -?[1-9][0-9]{0,14} | "[ !#-\[\]-~]{0,256}" |
   true | false | null, followed by ',' or '}' (not consumed) */
static int flat_value(cursor *c) {
    const unsigned char *p = c->p, *end = c->end;
    if (p < end && *p == '0') {
        p++;
    } else if (p < end && (*p == '-' || (*p >= '1' && *p <= '9'))) {
        if (*p == '-')
            p++;
        if (p >= end || *p < '1' || *p > '9')
            return 0;
        const unsigned char *first = p++;
        while (p < end && is_digit(*p))
            p++;
        if (p - first > 15)
            return 0;
    } else if (p < end && *p == '"') {
        const unsigned char *first = ++p;
        while (p < end && text_rest(*p))
            p++;
        if (p >= end || *p != '"' || p - first > 256)
            return 0;
        p++;
    } else if (end - p >= 4 && memcmp(p, "true", 4) == 0) {
        p += 4;
    } else if (end - p >= 5 && memcmp(p, "false", 5) == 0) {
        p += 5;
    } else if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
        p += 4;
    } else {
        return 0;
    }
    if (p >= end || (*p != ',' && *p != '}'))
        return 0;
    c->p = p;
    return 1;
}

/* the metadata ({...}) is flat, with distinct keys: written as it is */
static int flat_metadata(const unsigned char *p, Py_ssize_t n) {
    const unsigned char *keys[MAX_KEYS];
    Py_ssize_t lengths[MAX_KEYS];
    int count = 0;
    cursor c = {p + 1, p + n};
    if (n < 2 || p[0] != '{' || p[n - 1] != '}')
        return 0;
    if (n == 2)
        return 1;
    for (;;) {
        if (!literal(&c, "\""))
            return 0;
        const unsigned char *key = c.p;
        while (c.p < c.end && ((*c.p >= 'A' && *c.p <= 'Z') || (*c.p >= 'a' && *c.p <= 'z') ||
                               is_digit(*c.p) || *c.p == '_'))
            c.p++;
        Py_ssize_t len = c.p - key;
        if (len < 1 || len > 64 || !literal(&c, "\":") || !flat_value(&c))
            return 0;
        if (count == MAX_KEYS)
            return 0; /* many keys: the Python check decides */
        for (int i = 0; i < count; i++)
            if (lengths[i] == len && memcmp(keys[i], key, len) == 0)
                return 0; /* a repeated key: pydantic's reading decides */
        keys[count] = key;
        lengths[count++] = len;
        if (*c.p == '}')
            return c.p == c.end - 1;
        c.p++; /* ',' */
    }
}

static unsigned char *put32(unsigned char *out, int32_t v) {
    uint32_t u = (uint32_t)v;
    out[0] = u >> 24;
    out[1] = u >> 16;
    out[2] = u >> 8;
    out[3] = u;
    return out + 4;
}

static unsigned char *put_text(unsigned char *out, const unsigned char *p, Py_ssize_t n) {
    out = put32(out, (int32_t)n);
    memcpy(out, p, n);
    return out + n;
}

static PyObject *fast_row(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs) {
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "_fastrow.configure() first");
        return NULL;
    }
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "fast_row(value, key, timestamp_ms=-1)");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1]) ||
        (nargs == 3 && !PyLong_CheckExact(args[2])))
        Py_RETURN_NONE;
    long long timestamp_ms = -1;
    if (nargs == 3) {
        int overflow = 0;
        timestamp_ms = PyLong_AsLongLongAndOverflow(args[2], &overflow);
        if (overflow || (timestamp_ms == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
    }
    if (timestamp_ms < -1 || timestamp_ms >= (1LL << 52))
        Py_RETURN_NONE;
    const unsigned char *value = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (size > event_max_bytes)
        Py_RETURN_NONE;
    cursor c = {value, value + size};
    const unsigned char *event_id, *user, *second, *fraction = NULL, *type, *service, *theme = NULL;
    const unsigned char *source;
    Py_ssize_t user_len, fraction_len = 0, type_len, service_len, theme_len = 0, source_len;
    int rating = 0;

    if (!literal(&c, "{\"eventId\":\"") || c.end - c.p < 36 || !uuid7(c.p))
        Py_RETURN_NONE;
    event_id = c.p;
    c.p += 36;
    if (!literal(&c, "\",\"userId\":\"") || !text(&c, user_id_max, &user, &user_len))
        Py_RETURN_NONE;
    if (!literal(&c, ",\"occurredAt\":\"") || c.end - c.p < 19)
        Py_RETURN_NONE;
    second = c.p;
    for (int i = 0; i < 19; i++) {
        int ok = (i == 4 || i == 7) ? c.p[i] == '-' : i == 10 ? c.p[i] == 'T'
                 : (i == 13 || i == 16) ? c.p[i] == ':' : is_digit(c.p[i]);
        if (!ok)
            Py_RETURN_NONE;
    }
    c.p += 19;
    if (c.p < c.end && *c.p == '.') {
        fraction = ++c.p;
        while (c.p < c.end && is_digit(*c.p))
            c.p++;
        fraction_len = c.p - fraction;
        if (fraction_len < 1 || fraction_len > 6)
            Py_RETURN_NONE;
    }
    if (!literal(&c, "Z\",\"schemaVersion\":1,\"source\":\"") ||
        !text(&c, source_max, &source, &source_len) ||
        !literal(&c, ",\"kind\":\"interaction\",\"type\":\""))
        Py_RETURN_NONE;
    type = c.p;
    while (c.p < c.end && *c.p != '"')
        c.p++;
    type_len = c.p - type;
    int known = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); i++) {
        PyObject *t = PyTuple_GET_ITEM(types, i);
        if (PyBytes_GET_SIZE(t) == type_len && memcmp(PyBytes_AS_STRING(t), type, type_len) == 0)
            known = 1;
    }
    if (!known || !literal(&c, "\",\"service\":\"") || !slug(&c, &service, &service_len) ||
        !literal(&c, ","))
        Py_RETURN_NONE;
    if (literal(&c, "\"theme\":\"")) {
        if (!slug(&c, &theme, &theme_len) || !literal(&c, ","))
            Py_RETURN_NONE;
    }
    if (literal(&c, "\"rating\":")) {
        if (c.p >= c.end || *c.p < '1' || *c.p > '5')
            Py_RETURN_NONE;
        rating = *c.p++ - '0';
        if (!literal(&c, ","))
            Py_RETURN_NONE;
    }
    if (!literal(&c, "\"metadata\":"))
        Py_RETURN_NONE;
    /* (\{.*\})\} to the end: the metadata is all but the last '}' */
    const unsigned char *metadata = c.p;
    Py_ssize_t metadata_len = c.end - c.p - 1;
    if (metadata_len < 2 || c.end[-1] != '}' || !flat_metadata(metadata, metadata_len))
        Py_RETURN_NONE;
    if (PyBytes_GET_SIZE(args[1]) != user_len || memcmp(PyBytes_AS_STRING(args[1]), user, user_len))
        Py_RETURN_NONE; /* the key is not the user id */

    long long at;
    if (!epoch_second(second, &at))
        Py_RETURN_NONE;
    if (at <= -(EXACT_DOUBLE / 1000000) || at >= EXACT_DOUBLE / 1000000)
        Py_RETURN_NONE; /* beyond a double's exact microseconds: Python's arithmetic decides */
    long long micros = at * 1000000;
    if (fraction != NULL) {
        long long f = 0;
        for (Py_ssize_t i = 0; i < 6; i++)
            f = f * 10 + (i < fraction_len ? fraction[i] - '0' : 0);
        micros += f;
    }
    if (timestamp_ms >= 0) {
        /* the Python test: micros / 1_000_000 * 1000 against whole
           milliseconds, every operand exact in a double */
        double at_ms = (double)micros / 1000000.0 * 1000.0;
        if (!((double)(timestamp_ms - past_bound_ms) <= at_ms &&
              at_ms <= (double)(timestamp_ms + future_bound_ms)))
            Py_RETURN_NONE;
    }

    Py_ssize_t row_size = 2 + 4 + 36 + 4 + user_len + 12 + 4 + type_len + 4 + service_len +
                          4 + theme_len + (rating ? 8 : 4) + 4 + 1 + metadata_len;
    PyObject *row = PyBytes_FromStringAndSize(NULL, row_size);
    if (row == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(row);
    *out++ = 0;
    *out++ = 8; /* columns */
    out = put_text(out, event_id, 36);
    out = put_text(out, user, user_len);
    out = put32(out, 8);
    uint64_t t = (uint64_t)(micros - EPOCH_2000_US);
    out = put32(out, (int32_t)(uint32_t)(t >> 32));
    out = put32(out, (int32_t)(uint32_t)t);
    out = put_text(out, type, type_len);
    out = put_text(out, service, service_len);
    out = theme ? put_text(out, theme, theme_len) : put32(out, -1);
    if (rating) {
        out = put32(out, 4);
        out = put32(out, rating);
    } else {
        out = put32(out, -1);
    }
    out = put32(out, (int32_t)(metadata_len + 1));
    *out++ = 1; /* jsonb's version */
    memcpy(out, metadata, metadata_len);

    PyObject *fields = PyTuple_New(4);
    PyObject *id_text = PyUnicode_DecodeASCII((const char *)event_id, 36, NULL);
    PyObject *user_text = PyUnicode_DecodeASCII((const char *)user, user_len, NULL);
    if (fields == NULL || id_text == NULL || user_text == NULL) {
        Py_XDECREF(fields);
        Py_XDECREF(id_text);
        Py_XDECREF(user_text);
        Py_DECREF(row);
        return NULL;
    }
    Py_INCREF(kind);
    PyTuple_SET_ITEM(fields, 0, id_text);
    PyTuple_SET_ITEM(fields, 1, user_text);
    PyTuple_SET_ITEM(fields, 2, row);
    PyTuple_SET_ITEM(fields, 3, kind);
    /* tuple.__new__(FastRow, fields), as the Python one makes it: the
       tuple's own constructor sets what a tuple holds besides its items
       (CPython 3.14 caches a hash there) */
    PyObject *packed = PyTuple_Pack(1, fields);
    Py_DECREF(fields);
    if (packed == NULL)
        return NULL;
    PyObject *result = PyTuple_Type.tp_new(row_type, packed, NULL);
    Py_DECREF(packed);
    return result;
}

static PyObject *configure(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *cls, *types_arg;
    Py_ssize_t a, b, d, e;
    long long f, g;
    if (!PyArg_ParseTuple(args, "O!nnnnLLO!", &PyType_Type, &cls, &a, &b, &d, &e, &f, &g,
                          &PyTuple_Type, &types_arg))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "the row type must be a tuple");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types_arg); i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(types_arg, i))) {
            PyErr_SetString(PyExc_TypeError, "the types must be bytes");
            return NULL;
        }
    }
    Py_INCREF(cls);
    Py_XSETREF(row_type, (PyTypeObject *)cls);
    Py_INCREF(types_arg);
    Py_XSETREF(types, types_arg);
    user_id_max = a;
    source_max = b;
    slug_max = d;
    event_max_bytes = e;
    past_bound_ms = f;
    future_bound_ms = g;
    configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fast_row", (PyCFunction)(void (*)(void))fast_row, METH_FASTCALL,
     "fast_row(value, key, timestamp_ms=-1): the FastRow sink/rows.py's fast_row makes, or None "
     "(then ask it)"},
    {"configure", configure, METH_VARARGS,
     "configure(row_type, user_id_max, source_max, slug_max, event_max_bytes, past_bound_ms, "
     "future_bound_ms, types)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastrow", NULL, -1, methods};

/* the sha256 of the patterns this file implements by hand (sink/rows.py's
   PATTERNS): a module built from an older copy of this file is not used */
#define PATTERNS "edae398870398bbd254c9b9607bc3dcbb9e7126e4c23f6717e9c4fccc86042b1"

PyMODINIT_FUNC PyInit__fastrow(void) {
    kind = PyUnicode_InternFromString("interaction");
    if (kind == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "PATTERNS", PATTERNS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
