/* safetensors.c - reading (mmap + full validation) and writing safetensors
 * files.
 *
 * Weight files come from anywhere, so the reader trusts nothing: every
 * length, offset and shape is checked against the mapping before a tensor
 * pointer is handed out, and the tensors must tile the data section exactly
 * (no holes, no overlaps, nothing left over), as the reference
 * implementation requires.  After st_open succeeds, every st_tensor's data
 * and nbytes are safe to read.
 */
#include "error.h"
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <unistr.h>

/* JSON numbers are doubles; integers above 2^53 cannot be represented
 * exactly, so such an offset or dimension could not mean what it says. */
#define JSON_MAX_INT 9007199254740992.0

static const char *const dtype_names[] = {"F32", "F16", "BF16"};
static const size_t dtype_sizes[] = {4, 2, 2};

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* A JSON number that is a whole number in [0, 2^53]. */
static int json_uint(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return -1;
    double d = v->valuedouble;
    if (!isfinite(d) || d < 0 || d > JSON_MAX_INT || d != floor(d))
        return -1;
    *out = (uint64_t)d;
    return 0;
}

static void format_shape(char *buf, size_t len, int ndim, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%" PRId64, i ? ", " : "", shape[i]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

static int parse_tensor(struct st_file *f, const cJSON *item, struct st_tensor *t, char *err,
                        size_t errlen)
{
    const char *name = t->name;
    if (!cJSON_IsObject(item))
        return error_fmt(err, errlen, "tensor \"%s\": entry is not a JSON object", name);
    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (const cJSON *it = item->child; it; it = it->next) {
        const cJSON **slot = strcmp(it->string, "dtype") == 0          ? &dtype
                             : strcmp(it->string, "shape") == 0        ? &shape
                             : strcmp(it->string, "data_offsets") == 0 ? &offsets
                                                                       : NULL;
        if (!slot)
            return error_fmt(err, errlen, "tensor \"%s\": unknown field \"%s\"", name, it->string);
        if (*slot)
            return error_fmt(err, errlen, "tensor \"%s\": field \"%s\" appears twice", name, it->string);
        *slot = it;
    }
    if (!dtype || !shape || !offsets)
        return error_fmt(err, errlen, "tensor \"%s\": \"%s\" is missing", name,
                    !dtype ? "dtype" : !shape ? "shape" : "data_offsets");

    if (!cJSON_IsString(dtype))
        return error_fmt(err, errlen, "tensor \"%s\": \"dtype\" must be a string", name);
    int d = 0;
    while (d < 3 && strcmp(dtype->valuestring, dtype_names[d]) != 0)
        d++;
    if (d == 3)
        return error_fmt(err, errlen, "tensor \"%s\": unsupported dtype \"%s\" (F32, F16 and BF16 are)",
                    name, dtype->valuestring);
    t->dtype = (enum st_dtype)d;

    int ndim = cJSON_IsArray(shape) ? cJSON_GetArraySize(shape) : -1;
    if (ndim < 0 || ndim > ST_MAX_DIMS)
        return error_fmt(err, errlen,
                    "tensor \"%s\": \"shape\" must be an array of at most %d non-negative integers",
                    name, ST_MAX_DIMS);
    /* numel is kept below 2^63; a shape whose product would not be is too
     * large for any file and is reported as a size mismatch below, unless
     * a zero dimension makes it empty after all. */
    int too_big = 0, empty = 0;
    uint64_t numel = 1;
    int i = 0;
    for (const cJSON *it = shape->child; it; it = it->next, i++) {
        uint64_t dim;
        if (json_uint(it, &dim))
            return error_fmt(err, errlen, "tensor \"%s\": shape[%d] must be a non-negative integer",
                        name, i);
        t->shape[i] = (int64_t)dim;
        if (dim == 0)
            empty = 1;
        else if (numel > (uint64_t)INT64_MAX / dim)
            too_big = 1;
        else
            numel *= dim;
    }
    t->ndim = ndim;
    if (empty) {
        numel = 0;
        too_big = 0;
    }

    uint64_t begin, end;
    if (!cJSON_IsArray(offsets) || cJSON_GetArraySize(offsets) != 2 ||
        json_uint(offsets->child, &begin) || json_uint(offsets->child->next, &end))
        return error_fmt(err, errlen,
                    "tensor \"%s\": \"data_offsets\" must be two non-negative integers", name);
    if (end < begin)
        return error_fmt(err, errlen, "tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] end before they begin",
                    name, begin, end);
    if (end > f->data_size)
        return error_fmt(err, errlen,
                    "tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] run past the end of "
                    "the data (%zu bytes)", name, begin, end, f->data_size);
    char sh[256];
    format_shape(sh, sizeof sh, t->ndim, t->shape);
    if (too_big || numel > UINT64_MAX / dtype_sizes[d] || numel * dtype_sizes[d] != end - begin)
        return error_fmt(err, errlen,
                    "tensor \"%s\": shape %s of %s does not fill data_offsets [%" PRIu64 ", %" PRIu64 "]",
                    name, sh, dtype_names[d], begin, end);
    t->numel = (int64_t)numel;
    t->data = f->data + begin;
    t->nbytes = (size_t)(end - begin);
    return 0;
}

static int parse_meta(struct st_file *f, const cJSON *item, char *err, size_t errlen)
{
    if (!cJSON_IsObject(item))
        return error_fmt(err, errlen, "\"__metadata__\" is not a JSON object");
    int n = cJSON_GetArraySize(item);
    f->meta = calloc((size_t)(n ? n : 1), sizeof *f->meta);
    if (!f->meta)
        return error_fmt(err, errlen, "out of memory");
    for (const cJSON *it = item->child; it; it = it->next) {
        if (!cJSON_IsString(it))
            return error_fmt(err, errlen, "metadata \"%s\" is not a string", it->string);
        struct st_meta *m = &f->meta[f->n_meta++];
        m->key = strdup(it->string);
        m->value = strdup(it->valuestring);
        if (!m->key || !m->value)
            return error_fmt(err, errlen, "out of memory");
    }
    return 0;
}

static int cmp_offset(const void *a, const void *b)
{
    const struct st_tensor *x = a, *y = b;
    if (x->data != y->data)
        return x->data < y->data ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static int cmp_name(const void *a, const void *b)
{
    const struct st_tensor *x = *(struct st_tensor *const *)a;
    const struct st_tensor *y = *(struct st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_meta(const void *a, const void *b)
{
    return strcmp(((const struct st_meta *)a)->key, ((const struct st_meta *)b)->key);
}

/* Sorts the tensors by offset and checks that they tile the data section,
 * then builds the by-name index, refusing duplicate names. */
static int check_layout(struct st_file *f, char *err, size_t errlen)
{
    qsort(f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, cmp_offset);
    size_t pos = 0;
    for (int i = 0; i < f->n_tensors; i++) {
        size_t off = (size_t)(f->tensors[i].data - f->data);
        if (off < pos)
            return error_fmt(err, errlen, "tensors \"%s\" and \"%s\" overlap", f->tensors[i - 1].name,
                        f->tensors[i].name);
        if (off > pos)
            return error_fmt(err, errlen, "data bytes %zu to %zu belong to no tensor", pos, off);
        pos = off + f->tensors[i].nbytes;
    }
    if (pos != f->data_size)
        return error_fmt(err, errlen, "data bytes %zu to %zu belong to no tensor", pos, f->data_size);

    struct st_tensor **byname = malloc((size_t)(f->n_tensors ? f->n_tensors : 1) * sizeof *byname);
    f->by_name = malloc((size_t)(f->n_tensors ? f->n_tensors : 1) * sizeof *f->by_name);
    if (!byname || !f->by_name) {
        free(byname);
        return error_fmt(err, errlen, "out of memory");
    }
    for (int i = 0; i < f->n_tensors; i++)
        byname[i] = &f->tensors[i];
    qsort(byname, (size_t)f->n_tensors, sizeof *byname, cmp_name);
    int rc = 0;
    for (int i = 0; i < f->n_tensors; i++) {
        f->by_name[i] = (int)(byname[i] - f->tensors);
        if (i > 0 && strcmp(byname[i - 1]->name, byname[i]->name) == 0 && rc == 0)
            rc = error_fmt(err, errlen, "tensor \"%s\" appears twice", byname[i]->name);
    }
    free(byname);
    if (rc)
        return rc;

    if (f->n_meta > 1) {
        /* Sorting a copy keeps the file's order in f->meta for reporting. */
        struct st_meta *copy = malloc((size_t)f->n_meta * sizeof *copy);
        if (!copy)
            return error_fmt(err, errlen, "out of memory");
        memcpy(copy, f->meta, (size_t)f->n_meta * sizeof *copy);
        qsort(copy, (size_t)f->n_meta, sizeof *copy, cmp_meta);
        for (int i = 1; i < f->n_meta && rc == 0; i++)
            if (strcmp(copy[i - 1].key, copy[i].key) == 0)
                rc = error_fmt(err, errlen, "metadata \"%s\" appears twice", copy[i].key);
        free(copy);
    }
    return rc;
}

static int parse_header(struct st_file *f, char *err, size_t errlen)
{
    const unsigned char *p = f->map;
    uint64_t n = le64(p);
    if (n > ST_MAX_HEADER)
        return error_fmt(err, errlen, "header length %" PRIu64 " is over the limit of %d bytes", n,
                    ST_MAX_HEADER);
    if (n > f->map_size - 8)
        return error_fmt(err, errlen,
                    "header length %" PRIu64 " runs past the end of the file (%zu bytes follow it)",
                    n, f->map_size - 8);
    f->data = p + 8 + n;
    f->data_size = f->map_size - 8 - (size_t)n;

    /* cJSON wants a NUL-terminated string; a NUL inside the header would
     * make it see a shorter header than the file has. */
    const char *text = (const char *)(p + 8);
    if (memchr(text, '\0', (size_t)n))
        return error_fmt(err, errlen, "header holds a NUL byte");
    if (u8_check((const uint8_t *)text, (size_t)n))
        return error_fmt(err, errlen, "header is not valid UTF-8");
    char *copy = malloc((size_t)n + 1);
    if (!copy)
        return error_fmt(err, errlen, "out of memory");
    memcpy(copy, text, (size_t)n);
    copy[n] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(copy, &end, 1);
    size_t at = end && end >= copy ? (size_t)(end - copy) : 0;
    free(copy);
    if (!root)
        return error_fmt(err, errlen, "header is not valid JSON (at byte %zu)", at);
    int rc = 0;
    if (!cJSON_IsObject(root)) {
        rc = error_fmt(err, errlen, "header is not a JSON object");
        goto out;
    }
    int count = cJSON_GetArraySize(root);
    f->tensors = calloc((size_t)(count ? count : 1), sizeof *f->tensors);
    if (!f->tensors) {
        rc = error_fmt(err, errlen, "out of memory");
        goto out;
    }
    int seen_meta = 0;
    for (const cJSON *it = root->child; it && rc == 0; it = it->next) {
        if (strcmp(it->string, "__metadata__") == 0) {
            rc = seen_meta++ ? error_fmt(err, errlen, "\"__metadata__\" appears twice")
                             : parse_meta(f, it, err, errlen);
            continue;
        }
        struct st_tensor *t = &f->tensors[f->n_tensors++];
        t->name = strdup(it->string);
        rc = t->name ? parse_tensor(f, it, t, err, errlen) : error_fmt(err, errlen, "out of memory");
    }
    if (rc == 0)
        rc = check_layout(f, err, errlen);
out:
    cJSON_Delete(root);
    return rc;
}

int st_open(const char *path, struct st_file *f, char *err, size_t errlen)
{
    memset(f, 0, sizeof *f);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return error_fmt(err, errlen, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return error_fmt(err, errlen, "cannot stat: %s", strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return error_fmt(err, errlen, "not a regular file");
    }
    if (st.st_size < 8) {
        close(fd);
        return error_fmt(err, errlen, "file is %lld bytes, too short for a safetensors header",
                    (long long)st.st_size);
    }
    if ((off_t)(size_t)st.st_size != st.st_size) {
        close(fd);
        return error_fmt(err, errlen, "file too large to map");
    }
    size_t size = (size_t)st.st_size;
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (map == MAP_FAILED)
        return error_fmt(err, errlen, "cannot map: %s", strerror(e));
    f->map = map;
    f->map_size = size;
    if (parse_header(f, err, errlen) != 0) {
        st_close(f);
        return -1;
    }
    return 0;
}

void st_close(struct st_file *f)
{
    if (f->map)
        munmap(f->map, f->map_size);
    for (int i = 0; i < f->n_tensors; i++)
        free(f->tensors[i].name);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta[i].key);
        free(f->meta[i].value);
    }
    free(f->tensors);
    free(f->meta);
    free(f->by_name);
    memset(f, 0, sizeof *f);
}

const struct st_tensor *st_find(const struct st_file *f, const char *name)
{
    int lo = 0, hi = f->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const struct st_tensor *t = &f->tensors[f->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0)
            return t;
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *st_meta_get(const struct st_file *f, const char *key)
{
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0)
            return f->meta[i].value;
    return NULL;
}

static void to_hex(const unsigned char *md, char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    hex[64] = '\0';
}

void st_data_sha256(const struct st_file *f, char hex[65])
{
    unsigned char md[32];
    unsigned int len = 0;
    /* EVP_Digest only fails when OpenSSL cannot allocate its context; an
     * empty string then compares unequal to any stored checksum, so a load
     * fails safely instead of trusting unchecked data. */
    if (!EVP_Digest(f->data, f->data_size, md, &len, EVP_sha256(), NULL) || len != 32) {
        hex[0] = '\0';
        return;
    }
    to_hex(md, hex);
}

static float f16_to_f32(unsigned h)
{
    unsigned sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t bits;
    if (exp == 0) {
        /* Zero or subnormal: man * 2^-24 is exact in float32. */
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    if (exp == 31)
        bits = (uint32_t)sign << 31 | 0x7f800000u | (uint32_t)man << 13;
    else
        bits = (uint32_t)sign << 31 | (uint32_t)(exp + 112) << 23 | (uint32_t)man << 13;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

void st_to_f32(const struct st_tensor *t, float *dst)
{
    const unsigned char *p = t->data;
    for (int64_t i = 0; i < t->numel; i++) {
        uint32_t bits;
        switch (t->dtype) {
        case ST_F32:
            bits = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 |
                   (uint32_t)p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24;
            memcpy(&dst[i], &bits, sizeof bits);
            break;
        case ST_F16:
            dst[i] = f16_to_f32((unsigned)p[2 * i] | (unsigned)p[2 * i + 1] << 8);
            break;
        case ST_BF16:
            bits = ((uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8) << 16;
            memcpy(&dst[i], &bits, sizeof bits);
            break;
        }
    }
}

/* ---- writing ---- */

/* Feeds count floats to sink as little-endian bytes, a chunk at a time, so
 * the file is the same on any host. */
static int emit_floats(const float *src, size_t count,
                       int (*sink)(void *ctx, const unsigned char *buf, size_t len), void *ctx)
{
    unsigned char buf[4096];
    while (count > 0) {
        size_t k = count < sizeof buf / 4 ? count : sizeof buf / 4;
        for (size_t i = 0; i < k; i++) {
            uint32_t bits;
            memcpy(&bits, &src[i], sizeof bits);
            buf[4 * i] = (unsigned char)bits;
            buf[4 * i + 1] = (unsigned char)(bits >> 8);
            buf[4 * i + 2] = (unsigned char)(bits >> 16);
            buf[4 * i + 3] = (unsigned char)(bits >> 24);
        }
        if (sink(ctx, buf, 4 * k))
            return -1;
        src += k;
        count -= k;
    }
    return 0;
}

static int sink_sha(void *ctx, const unsigned char *buf, size_t len)
{
    return EVP_DigestUpdate(ctx, buf, len) ? 0 : -1;
}

static int sink_file(void *ctx, const unsigned char *buf, size_t len)
{
    return fwrite(buf, 1, len, ctx) == len ? 0 : -1;
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Returns the first string that occurs twice in s[0..n), or NULL. */
static const char *find_duplicate(const char **s, int n)
{
    qsort(s, (size_t)n, sizeof *s, cmp_str_ptr);
    for (int i = 1; i < n; i++)
        if (strcmp(s[i - 1], s[i]) == 0)
            return s[i];
    return NULL;
}

static int valid_utf8(const char *s)
{
    return u8_check((const uint8_t *)s, strlen(s)) == NULL;
}

static int check_write_args(const struct st_write_tensor *t, int n, const struct st_meta *meta,
                            int n_meta, size_t *numel, char *err, size_t errlen)
{
    if (n < 0 || n_meta < 0 || (n > 0 && !t) || (n_meta > 0 && !meta))
        return error_fmt(err, errlen, "invalid tensor or metadata list");
    for (int i = 0; i < n; i++) {
        if (!t[i].name || !valid_utf8(t[i].name) || strcmp(t[i].name, "__metadata__") == 0)
            return error_fmt(err, errlen, "tensor %d: invalid name", i);
        if (t[i].ndim < 0 || t[i].ndim > ST_MAX_DIMS)
            return error_fmt(err, errlen, "tensor \"%s\": %d dims, at most %d are supported",
                        t[i].name, t[i].ndim, ST_MAX_DIMS);
        size_t count = 1;
        for (int d = 0; d < t[i].ndim; d++) {
            int64_t dim = t[i].shape[d];
            if (dim < 0 || (double)dim > JSON_MAX_INT)
                return error_fmt(err, errlen, "tensor \"%s\": invalid shape", t[i].name);
            if (dim != 0 && count > SIZE_MAX / 4 / (uint64_t)dim)
                return error_fmt(err, errlen, "tensor \"%s\": too large", t[i].name);
            count *= (size_t)dim;
        }
        if (count > 0 && !t[i].data)
            return error_fmt(err, errlen, "tensor \"%s\": no data", t[i].name);
        numel[i] = count;
    }
    for (int i = 0; i < n_meta; i++) {
        if (!meta[i].key || !meta[i].value || !valid_utf8(meta[i].key) ||
            !valid_utf8(meta[i].value))
            return error_fmt(err, errlen, "metadata %d: key and value must be UTF-8 strings", i);
        if (strcmp(meta[i].key, "data_sha256") == 0)
            return error_fmt(err, errlen, "metadata \"data_sha256\" is written by st_write itself");
    }

    int most = n > n_meta ? n : n_meta;
    const char **names = malloc((size_t)(most ? most : 1) * sizeof *names);
    if (!names)
        return error_fmt(err, errlen, "out of memory");
    for (int i = 0; i < n; i++)
        names[i] = t[i].name;
    const char *dup = find_duplicate(names, n);
    int rc = dup ? error_fmt(err, errlen, "tensor \"%s\" appears twice", dup) : 0;
    for (int i = 0; i < n_meta && rc == 0; i++)
        names[i] = meta[i].key;
    if (rc == 0 && (dup = find_duplicate(names, n_meta)) != NULL)
        rc = error_fmt(err, errlen, "metadata \"%s\" appears twice", dup);
    free(names);
    return rc;
}

/* The JSON header, before padding: __metadata__ first, as the reference
 * implementation writes it, then the tensors in the caller's order. */
static char *build_header(const struct st_write_tensor *t, int n, const size_t *numel,
                          const struct st_meta *meta, int n_meta, const char *sha)
{
    cJSON *root = cJSON_CreateObject();
    cJSON *m = root ? cJSON_AddObjectToObject(root, "__metadata__") : NULL;
    int ok = m != NULL;
    for (int i = 0; i < n_meta && ok; i++)
        ok = cJSON_AddStringToObject(m, meta[i].key, meta[i].value) != NULL;
    ok = ok && cJSON_AddStringToObject(m, "data_sha256", sha);
    double offset = 0;
    for (int i = 0; i < n && ok; i++) {
        cJSON *e = cJSON_AddObjectToObject(root, t[i].name);
        cJSON *shape = e && cJSON_AddStringToObject(e, "dtype", "F32")
                           ? cJSON_AddArrayToObject(e, "shape")
                           : NULL;
        ok = shape != NULL;
        for (int d = 0; d < t[i].ndim && ok; d++) {
            cJSON *v = cJSON_CreateNumber((double)t[i].shape[d]);
            ok = v && cJSON_AddItemToArray(shape, v);
            if (!ok)
                cJSON_Delete(v);
        }
        double end = offset + 4.0 * (double)numel[i];
        double pair[2] = {offset, end};
        cJSON *offs = ok ? cJSON_CreateDoubleArray(pair, 2) : NULL;
        ok = offs && cJSON_AddItemToObject(e, "data_offsets", offs);
        if (!ok)
            cJSON_Delete(offs);
        offset = end;
    }
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

static int write_file(FILE *fp, const char *header, const struct st_write_tensor *t, int n,
                      const size_t *numel)
{
    /* Padding the header with spaces to a multiple of 8 keeps the data
     * section 8-byte aligned in the file, so readers can map F32 data
     * directly; JSON ignores the trailing spaces. */
    size_t len = strlen(header);
    size_t padded = (len + 7) / 8 * 8;
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++)
        lenbuf[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    if (fwrite(lenbuf, 1, 8, fp) != 8 || fwrite(header, 1, len, fp) != len)
        return -1;
    for (size_t i = len; i < padded; i++)
        if (fputc(' ', fp) == EOF)
            return -1;
    for (int i = 0; i < n; i++)
        if (emit_floats(t[i].data, numel[i], sink_file, fp))
            return -1;
    return 0;
}

/* Makes the rename itself durable.  Some file systems refuse fsync on a
 * directory; the file's own data is already synced by then, so a failure
 * here is not worth failing the save for. */
static void sync_parent(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir)
        return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

/* A new file beside path, path.tmp.XXXXXX, that st_write writes and then
 * renames to path: its descriptor and *tmp its malloc'd name, or -1 with
 * err. */
static int create_tmp(const char *path, char **tmp, char *err, size_t errlen)
{
    size_t plen = strlen(path);
    *tmp = malloc(plen + sizeof ".tmp.XXXXXX");
    if (!*tmp)
        return error_fmt(err, errlen, "out of memory");
    memcpy(*tmp, path, plen);
    memcpy(*tmp + plen, ".tmp.XXXXXX", sizeof ".tmp.XXXXXX");
    int fd = mkstemp(*tmp);
    if (fd < 0) {
        error_fmt(err, errlen, "cannot create %s: %s", *tmp, strerror(errno));
        free(*tmp);
        *tmp = NULL;
    }
    return fd;
}

int st_check_writable(const char *path, char *err, size_t errlen)
{
    char *tmp;
    int fd = create_tmp(path, &tmp, err, errlen);
    if (fd < 0)
        return -1;
    close(fd);
    unlink(tmp);
    free(tmp);
    return 0;
}

int st_write(const char *path, const struct st_write_tensor *t, int n,
             const struct st_meta *meta, int n_meta, char *err, size_t errlen)
{
    size_t *numel = malloc((size_t)(n > 0 ? n : 1) * sizeof *numel);
    if (!numel)
        return error_fmt(err, errlen, "out of memory");
    char *header = NULL, *tmp = NULL;
    FILE *fp = NULL;
    int rc = check_write_args(t, n, meta, n_meta, numel, err, errlen);
    if (rc)
        goto out;

    unsigned char md[32];
    unsigned int mdlen = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
    for (int i = 0; i < n && ok; i++)
        ok = emit_floats(t[i].data, numel[i], sink_sha, ctx) == 0;
    ok = ok && EVP_DigestFinal_ex(ctx, md, &mdlen) && mdlen == 32;
    EVP_MD_CTX_free(ctx);
    if (!ok) {
        rc = error_fmt(err, errlen, "cannot compute SHA-256");
        goto out;
    }
    char hex[65];
    to_hex(md, hex);
    header = build_header(t, n, numel, meta, n_meta, hex);
    if (!header) {
        rc = error_fmt(err, errlen, "out of memory");
        goto out;
    }

    int fd = create_tmp(path, &tmp, err, errlen);
    if (fd < 0) {
        rc = -1;
        goto out;
    }
    /* mkstemp creates the file 0600; weight files are data to share. */
    if (fchmod(fd, 0644) != 0 || !(fp = fdopen(fd, "wb"))) {
        rc = error_fmt(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
        close(fd);
        goto out;
    }
    if (write_file(fp, header, t, n, numel) || fflush(fp) || fsync(fileno(fp))) {
        rc = error_fmt(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
        goto out;
    }
    int closed = fclose(fp);
    fp = NULL;
    if (closed != 0 || rename(tmp, path) != 0) {
        rc = error_fmt(err, errlen, "cannot write %s: %s", path, strerror(errno));
        goto out;
    }
    free(tmp);
    tmp = NULL;
    sync_parent(path);
out:
    if (fp)
        fclose(fp);
    if (tmp)
        unlink(tmp);
    free(tmp);
    free(header);
    free(numel);
    return rc;
}
