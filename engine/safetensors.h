/* safetensors.h - reading and writing safetensors files.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON header,
 * then the raw little-endian tensor data.  The header maps tensor names to
 * {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
 * start of the data) and may hold "__metadata__", a string-to-string map.
 *
 * The reader maps the file read-only and validates everything a hostile or
 * truncated file could get wrong before any tensor is touched: header length
 * past the end, bad JSON, unknown dtypes, shapes whose byte size does not
 * match the offsets, offsets out of range, overlapping or leaving holes,
 * non-string metadata.  Every error message names the file's problem and,
 * where there is one, the tensor or field.
 */
#ifndef RRN_SAFETENSORS_H
#define RRN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8
/* The reference implementation's limit on the JSON header, in bytes. */
#define ST_MAX_HEADER 100000000

enum st_dtype { ST_F32, ST_F16, ST_BF16 };

struct st_tensor {
    char *name;
    enum st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const unsigned char *data; /* into the mapping; not aligned */
    size_t nbytes;
};

struct st_meta {
    char *key;
    char *value;
};

struct st_file {
    void *map;
    size_t map_size;
    const unsigned char *data; /* first byte after the header */
    size_t data_size;
    int n_tensors;
    struct st_tensor *tensors; /* sorted by data offset */
    int n_meta;
    struct st_meta *meta;
    int *by_name; /* indices into tensors, sorted by name, for st_find */
};

/* Map and validate a file.  Returns 0, or -1 with a message in err. */
int st_open(const char *path, struct st_file *f, char *err, size_t errlen);
void st_close(struct st_file *f);

const struct st_tensor *st_find(const struct st_file *f, const char *name);
const char *st_meta_get(const struct st_file *f, const char *key); /* NULL if absent */

/* Hex SHA-256 (65 bytes with NUL) of the data section. */
void st_data_sha256(const struct st_file *f, char hex[65]);

/* Convert a tensor's elements to float32 (dst holds t->numel floats). */
void st_to_f32(const struct st_tensor *t, float *dst);

/* A tensor to write: F32 data from memory. */
struct st_write_tensor {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data;
};

/* Write tensors (F32) and metadata.  A "data_sha256" entry is added to the
 * metadata with the checksum of the data section.  Writes to a temporary
 * file and renames it, so a reader never sees half a file. */
int st_write(const char *path, const struct st_write_tensor *t, int n,
             const struct st_meta *meta, int n_meta, char *err, size_t errlen);
/* 0 when st_write could create its temporary file beside path (the folder
 * is there and writable), which is made and removed; else -1 with err
 * naming it and why. */
int st_check_writable(const char *path, char *err, size_t errlen);

#endif
