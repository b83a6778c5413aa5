/* gb28181.sip._fast: C twins of the SIP parser's header loop (message.parse_head) and of the
 * digest parameter reader (auth.parse_auth_params, below).
 *
 * parse_head(data, compact, split) reads the head of a SIP message (RFC 3261 section 7:
 * start line, header fields, an empty line) when it has the plain shape that devices and
 * sipp send: every line ends in CRLF, the head ends at the first CRLF CRLF, no line is folded
 * (section 7.3.1), every byte of the head is printable ASCII or a tab, every header name is a
 * token (section 25.1) and a Via/Route/Record-Route value (the `split` names) holds no comma.
 * It then returns (start line, {lower-case long name: [values]}, index where the body starts),
 * exactly as message.parse_head does; for anything else it returns None and the caller takes
 * the general pure-Python path, which also names every fault. So this code never raises on
 * odd input and never has to agree with Python on an error message.
 *
 * `compact` maps lower-case names to their long form (section 7.3.3: "v" -> "via"); values
 * are trimmed of spaces and tabs (section 25.1 LWS).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
 * (RFC 3261 section 25.1) */
static unsigned char is_token[256];
/* what a line of the head may hold: printable ASCII and HT */
static unsigned char is_text[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        is_token[c] = (unsigned char)((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                                      (c >= '0' && c <= '9') || (c != 0 && strchr("-.!%*_+`'~", c) != NULL));
        is_text[c] = (unsigned char)((c >= 0x20 && c <= 0x7e) || c == '\t');
    }
}

/* A str of the ASCII bytes p[0:n] (already checked to be ASCII). */
static PyObject *ascii_str(const unsigned char *p, Py_ssize_t n) {
    PyObject *s = PyUnicode_New(n, 127);
    if (s == NULL) return NULL;
    memcpy(PyUnicode_DATA(s), p, (size_t)n);
    return s;
}

static PyObject *parse_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "parse_head(data, compact, split) takes 3 arguments");
        return NULL;
    }
    PyObject *compact = args[1], *split = args[2];
    if (!PyDict_Check(compact)) {
        PyErr_SetString(PyExc_TypeError, "compact must be a dict");
        return NULL;
    }
    if (!PyAnySet_Check(split)) {
        PyErr_SetString(PyExc_TypeError, "split must be a set or frozenset");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    const Py_ssize_t n = view.len;
    PyObject *headers = NULL, *first = NULL, *result = NULL;
    char lower[128];

    if (n == 0 || p[0] == '\r' || p[0] == '\n') goto fallback;

    /* The head: bytes up to the first CRLF CRLF, checked byte by byte as it is found. */
    Py_ssize_t end = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (is_text[c]) continue;
        if (c != '\r' || i + 1 >= n || p[i + 1] != '\n') goto fallback; /* bare CR or LF, control, 8-bit */
        if (i + 3 < n && p[i + 2] == '\r' && p[i + 3] == '\n') {
            end = i;
            break;
        }
        i++; /* past the LF of this CRLF */
    }
    if (end < 0) goto fallback;

    /* The start line: up to the first CRLF (non-empty: p[0] is neither CR nor LF). */
    Py_ssize_t eol = 0;
    while (eol < end && p[eol] != '\r') eol++;
    first = ascii_str(p, eol);
    if (first == NULL) goto error;
    headers = PyDict_New();
    if (headers == NULL) goto error;

    Py_ssize_t pos = eol + 2; /* start of the next line; == end + 2 when there is none */
    while (pos < end) {
        Py_ssize_t stop = pos;
        while (stop < end && p[stop] != '\r') stop++;
        /* line = p[pos:stop], not empty (CRLF CRLF is only at `end`) */
        if (p[pos] == ' ' || p[pos] == '\t') goto fallback; /* folded (section 7.3.1) */
        Py_ssize_t colon = pos;
        while (colon < stop && p[colon] != ':') colon++;
        Py_ssize_t name_len = colon - pos;
        if (colon == stop || name_len == 0 || name_len >= (Py_ssize_t)sizeof(lower)) goto fallback;
        for (Py_ssize_t k = 0; k < name_len; k++) {
            unsigned char c = p[pos + k];
            if (!is_token[c]) goto fallback;
            lower[k] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
        PyObject *name = ascii_str((const unsigned char *)lower, name_len);
        if (name == NULL) goto error;
        PyObject *longname = PyDict_GetItemWithError(compact, name); /* borrowed */
        if (longname == NULL && PyErr_Occurred()) {
            Py_DECREF(name);
            goto error;
        }
        if (longname != NULL) {
            if (!PyUnicode_Check(longname)) {
                Py_DECREF(name);
                goto fallback;
            }
            Py_INCREF(longname);
            Py_SETREF(name, longname);
        }
        Py_ssize_t vs = colon + 1, ve = stop;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t')) vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t')) ve--;
        if (memchr(p + vs, ',', (size_t)(ve - vs)) != NULL) {
            int in_split = PySet_Contains(split, name);
            if (in_split != 0) {
                Py_DECREF(name);
                if (in_split < 0) goto error;
                goto fallback; /* several values in one field: the general path splits them */
            }
        }
        PyObject *value = ascii_str(p + vs, ve - vs);
        if (value == NULL) {
            Py_DECREF(name);
            goto error;
        }
        PyObject *values = PyDict_GetItemWithError(headers, name); /* borrowed */
        int failed;
        if (values != NULL) {
            failed = PyList_Append(values, value);
        } else if (PyErr_Occurred()) {
            failed = -1;
        } else {
            values = PyList_New(1);
            if (values == NULL) {
                failed = -1;
            } else {
                Py_INCREF(value);
                PyList_SET_ITEM(values, 0, value);
                failed = PyDict_SetItem(headers, name, values);
                Py_DECREF(values);
            }
        }
        Py_DECREF(value);
        Py_DECREF(name);
        if (failed < 0) goto error;
        pos = stop + 2;
    }
    result = Py_BuildValue("(OOn)", first, headers, end + 4);
    goto done;

fallback:
    result = Py_NewRef(Py_None);
    goto done;
error:
    result = NULL;
done:
    Py_XDECREF(first);
    Py_XDECREF(headers);
    PyBuffer_Release(&view);
    return result;
}

/* parse_auth_params(value): `Digest k="v", k2=v2` (RFC 2617 section 3.2.2, RFC 3261 section
 * 22.4) as (scheme, {lower-case key: value}), exactly as auth.parse_auth_params reads it, for a
 * value of printable ASCII and tabs without a backslash (no quoted-pair to undo); None for any
 * other value, which the pure-Python code reads. Parameters are taken up to the first piece
 * that is not key=value, as there: each is
 *     LWS key LWS "=" LWS ( DQUOTE *(not DQUOTE) DQUOTE / *(not DQUOTE, comma, LWS) ) LWS
 * followed by a comma or the end. */
static int is_key(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '-';
}

static int is_lws(unsigned char c) { return c == ' ' || c == '\t'; }

static PyObject *parse_auth_params(PyObject *module, PyObject *value) {
    (void)module;
    if (!PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "parse_auth_params() takes a str");
        return NULL;
    }
    if (PyUnicode_READY(value) < 0) return NULL;
    if (!PyUnicode_IS_ASCII(value)) Py_RETURN_NONE;
    const unsigned char *s = PyUnicode_1BYTE_DATA(value);
    Py_ssize_t n = PyUnicode_GET_LENGTH(value);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_text[s[i]] || s[i] == '\\') Py_RETURN_NONE;
    }
    /* value.strip(), then scheme, _, rest = value.partition(" "), then rest.strip() */
    Py_ssize_t a = 0, b = n;
    while (a < b && is_lws(s[a])) a++;
    while (b > a && is_lws(s[b - 1])) b--;
    Py_ssize_t sp = a;
    while (sp < b && s[sp] != ' ') sp++;
    PyObject *scheme = ascii_str(s + a, sp - a);
    if (scheme == NULL) return NULL;
    PyObject *params = PyDict_New();
    if (params == NULL) {
        Py_DECREF(scheme);
        return NULL;
    }
    Py_ssize_t i = sp < b ? sp + 1 : b;
    while (i < b && is_lws(s[i])) i++;
    char key[256];
    while (i < b) {
        Py_ssize_t p = i;
        while (p < b && is_lws(s[p])) p++;
        Py_ssize_t ks = p;
        while (p < b && is_key(s[p])) p++;
        Py_ssize_t ke = p;
        if (ke == ks) break;
        while (p < b && is_lws(s[p])) p++;
        if (p >= b || s[p] != '=') break;
        p++;
        while (p < b && is_lws(s[p])) p++;
        Py_ssize_t vs, ve;
        if (p < b && s[p] == '"') {
            const unsigned char *q = memchr(s + p + 1, '"', (size_t)(b - p - 1));
            if (q == NULL) break;
            vs = p + 1;
            ve = q - s;
            p = ve + 1;
        } else {
            vs = p;
            while (p < b && s[p] != '"' && s[p] != ',' && !is_lws(s[p])) p++;
            ve = p;
        }
        while (p < b && is_lws(s[p])) p++;
        if (p < b && s[p] != ',') break;
        /* a whole parameter: keep it */
        PyObject *k;
        if (ke - ks < (Py_ssize_t)sizeof(key)) {
            for (Py_ssize_t j = 0; j < ke - ks; j++) {
                unsigned char c = s[ks + j];
                key[j] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
            }
            k = ascii_str((const unsigned char *)key, ke - ks);
        } else {
            PyObject *raw = ascii_str(s + ks, ke - ks);
            k = raw == NULL ? NULL : PyObject_CallMethod(raw, "lower", NULL);
            Py_XDECREF(raw);
        }
        PyObject *v = k == NULL ? NULL : ascii_str(s + vs, ve - vs);
        if (v == NULL || PyDict_SetItem(params, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(scheme);
            Py_DECREF(params);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
        i = p < b ? p + 1 : b; /* past the comma */
    }
    PyObject *result = PyTuple_Pack(2, scheme, params);
    Py_DECREF(scheme);
    Py_DECREF(params);
    return result;
}

static PyMethodDef methods[] = {
    {"parse_head", (PyCFunction)(void (*)(void))parse_head, METH_FASTCALL,
     "parse_head(data, compact, split) -> (start_line, headers, body_start) or None"},
    {"parse_auth_params", (PyCFunction)parse_auth_params, METH_O,
     "parse_auth_params(value) -> (scheme, params) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gb28181.sip._fast",
    "C twins of gb28181.sip.message.parse_head and auth.parse_auth_params (see _fast.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fast(void) {
    init_tables();
    return PyModule_Create(&module);
}
