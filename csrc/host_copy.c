/* Host-to-host copies of address runs (the CPU transfer engine's copy loop), and the runs of a
 * step's page <-> bank-row plan (layer_plan's compiled builder).
 *
 * copy_runs(src, dst, sizes, threads) copies sizes[i % len(sizes)] bytes from address src[i] to
 * dst[i] for every run i (uint64 buffers, e.g. numpy arrays; src and dst of equal length, a
 * multiple of len(sizes): a step's layers share one layer's sizes), with the GIL released.
 *
 * Why compiled: a step moves megabytes as tens to hundreds of runs of 10-200 KiB. One
 * ctypes.memmove per run from Python reached about half of a contiguous torch copy of the same
 * bytes, for two reasons this file removes:
 *  - one thread: torch copies a large tensor on its intra-op threads. A job of at least two
 *    PART_MIN_BYTES is split into equal byte ranges (a run may straddle two), one per thread of
 *    torch's own OpenMP pool (see look_up_openmp);
 *  - cached stores: a job that does not fit the caches pays a read of every destination line
 *    before it is written. Jobs of at least stream_min_bytes use non-temporal (streaming) stores
 *    on x86-64; smaller jobs keep memcpy, whose stores leave the data in cache for the next read.
 *    The threshold follows the last-level cache, as glibc's memcpy sets its own non-temporal
 *    threshold (3/4 of the shared cache): a job that fits the cache copies faster through it
 *    (measured on a 480 MiB L3, a 37.7 MB job: 0.93-0.96x the contiguous torch copy with cached
 *    stores, 0.66-0.80x streaming). Unknown cache size: 4 MiB, about a core's share of a server L3.
 *
 * Runs must not overlap (the planner checks ranges); the copies of one job are unordered, as on a
 * CUDA stream.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <emmintrin.h>
#define HAVE_STREAM_STORES 1
#else
#define HAVE_STREAM_STORES 0
#endif

#define MAX_THREADS 256
#ifndef PART_MIN_BYTES
#define PART_MIN_BYTES ((uint64_t)128 << 10)   /* below this a part costs more to start than it saves */
#endif
#define STREAM_FALLBACK_BYTES ((uint64_t)4 << 20) /* when the last-level cache size is unknown */
static uint64_t stream_min_bytes; /* set at import: see cache_stream_threshold */

typedef struct {
    const uint64_t *src, *dst, *sizes;
    Py_ssize_t n, num_sizes; /* run i is sizes[i % num_sizes] bytes */
    uint64_t total;
    int parts;
    int stream;
} Job;

static void copy_bytes(char *d, const char *s, size_t n, int stream) {
#if HAVE_STREAM_STORES
    if (stream && n >= 256) {
        size_t head = (16 - ((uintptr_t)d & 15)) & 15;
        memcpy(d, s, head);
        d += head, s += head, n -= head;
        for (; n >= 64; n -= 64, d += 64, s += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
            _mm_stream_si128((__m128i *)d, a);
            _mm_stream_si128((__m128i *)(d + 16), b);
            _mm_stream_si128((__m128i *)(d + 32), c);
            _mm_stream_si128((__m128i *)(d + 48), e);
        }
    }
#else
    (void)stream;
#endif
    memcpy(d, s, n);
}

/* Part `part` of the job: the bytes [total * part / parts, total * (part + 1) / parts) of the
 * runs laid end to end, so a run may be split between two parts. */
static void copy_part(const Job *job, int part) {
    uint64_t lo = job->total * (uint64_t)part / (uint64_t)job->parts;
    uint64_t hi = job->total * (uint64_t)(part + 1) / (uint64_t)job->parts;
    uint64_t at = 0;
    for (Py_ssize_t i = 0; i < job->n && at < hi; i++) {
        uint64_t begin = at, end = at + job->sizes[i % job->num_sizes];
        at = end;
        if (end <= lo) continue;
        uint64_t from = begin < lo ? lo : begin, to = end > hi ? hi : end;
        copy_bytes((char *)(uintptr_t)(job->dst[i] + (from - begin)),
                   (const char *)(uintptr_t)(job->src[i] + (from - begin)), (size_t)(to - from), job->stream);
    }
#if HAVE_STREAM_STORES
    if (job->stream) _mm_sfence(); /* streaming stores are visible before the part is reported done */
#endif
}

/* 3/4 of the last-level cache (sysconf's L3, else L2), at least STREAM_FALLBACK_BYTES. */
static uint64_t cache_stream_threshold(void) {
    long cache = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    cache = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
    if (cache <= 0) cache = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    uint64_t bytes = cache > 0 ? (uint64_t)cache / 4 * 3 : 0;
    return bytes > STREAM_FALLBACK_BYTES ? bytes : STREAM_FALLBACK_BYTES;
}

/* --- torch's OpenMP threads: GOMP_parallel of the libgomp already loaded into the process. Not
 * linked with -fopenmp: that would load the compiler's libgomp beside torch's, a second pool whose
 * threads compete with torch's for the same cores (torch's workers spin for a while after each
 * parallel region); on this pool a copy that follows compute finds the workers awake. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel;
static omp_int_fn omp_thread_num, omp_num_threads;
static int openmp_state; /* 0: not looked up yet, 1: found, -1: none loaded (copies stay on the caller) */
#if defined(__linux__)
static char openmp_path[4096];

static int find_libgomp(struct dl_phdr_info *info, size_t size, void *unused) {
    (void)size, (void)unused;
    const char *name = info->dlpi_name, *base = name ? strrchr(name, '/') : NULL;
    base = base ? base + 1 : name;
    if (base && strncmp(base, "libgomp", 7) == 0 && strlen(name) < sizeof(openmp_path)) {
        strcpy(openmp_path, name);
        return 1;
    }
    return 0;
}
#endif

static void look_up_openmp(void) {
    openmp_state = -1;
#if defined(__linux__)
    if (!dl_iterate_phdr(find_libgomp, NULL)) return;
    void *lib = dlopen(openmp_path, RTLD_NOW | RTLD_NOLOAD); /* the loaded copy, not a new one */
    if (lib == NULL) return;
    gomp_parallel = (gomp_parallel_fn)dlsym(lib, "GOMP_parallel");
    omp_thread_num = (omp_int_fn)dlsym(lib, "omp_get_thread_num");
    omp_num_threads = (omp_int_fn)dlsym(lib, "omp_get_num_threads");
    if (gomp_parallel != NULL && omp_thread_num != NULL && omp_num_threads != NULL) openmp_state = 1;
#endif
}

/* libgomp's pool does not survive fork: a child's parallel region waits forever for the parent's
 * workers (torch's own ops hang there too). A forked child copies on its calling thread. */
static void after_fork_in_child(void) { openmp_state = -1; }

/* The team may be smaller than asked for (OMP_THREAD_LIMIT, OMP_DYNAMIC): thread i of n copies
 * parts i, i + n, ..., so every part is copied by exactly one thread. */
static void copy_thread_parts(void *arg) {
    Job *job = arg;
    int n = omp_num_threads();
    for (int part = omp_thread_num(); part < job->parts; part += n) copy_part(job, part);
}

static void run_job(Job *job, int threads) {
    uint64_t by_size = job->total / PART_MIN_BYTES;
    job->parts = by_size < (uint64_t)threads ? (int)by_size : threads;
    if (job->parts <= 1 || openmp_state != 1) {
        job->parts = 1;
        copy_part(job, 0);
    } else {
        gomp_parallel(copy_thread_parts, job, (unsigned)job->parts, 0);
    }
}

static int address_buffer(PyObject *obj, const char *name, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) != 0) return -1;
    if (view->len % 8 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous buffer of uint64 values, got %zd bytes", name,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *copy_runs(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *src_obj, *dst_obj, *sizes_obj;
    int threads;
    long long stream_min = -1;
    if (!PyArg_ParseTuple(args, "OOOi|L:copy_runs", &src_obj, &dst_obj, &sizes_obj, &threads, &stream_min)) {
        return NULL;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        return PyErr_Format(PyExc_ValueError, "threads=%d: expected 1 to %d", threads, MAX_THREADS);
    }
    if (stream_min < -1) {
        return PyErr_Format(PyExc_ValueError, "stream_min=%lld: expected bytes >= 0, or -1 for STREAM_MIN_BYTES",
                            stream_min);
    }
    Py_buffer src, dst, sizes;
    if (address_buffer(src_obj, "src", &src) != 0) return NULL;
    if (address_buffer(dst_obj, "dst", &dst) != 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (address_buffer(sizes_obj, "sizes", &sizes) != 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    PyObject *result = Py_None;
    if (src.len != dst.len || (sizes.len == 0 ? src.len != 0 : src.len % sizes.len != 0)) {
        PyErr_Format(PyExc_ValueError, "src, dst, sizes: expected src and dst of one length, a multiple of "
                     "sizes' length, got %zd, %zd, %zd values", src.len / 8, dst.len / 8, sizes.len / 8);
        result = NULL;
    } else {
        Job job = {src.buf, dst.buf, sizes.buf, src.len / 8, sizes.len / 8, 0, 1, 0};
        uint64_t one = 0; /* the bytes of one pass over sizes */
        for (Py_ssize_t i = 0; i < job.num_sizes; i++) one += job.sizes[i];
        job.total = job.num_sizes ? one * (uint64_t)(job.n / job.num_sizes) : 0;
        job.stream = HAVE_STREAM_STORES && job.total >= (stream_min < 0 ? stream_min_bytes : (uint64_t)stream_min);
        if (openmp_state == 0 && threads > 1) look_up_openmp(); /* under the GIL: once per process */
        Py_BEGIN_ALLOW_THREADS
        run_job(&job, threads);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&sizes);
    Py_XINCREF(result);
    return result;
}

/* --- plan_runs: one step's page <-> slot-row runs (layer_plan._plan_compiled checks the inputs) ---
 *
 * Why compiled: a step is planned right after compute, from cold caches, where the Python loop
 * and the dozen numpy calls that build the same arrays cost 60-90 us for a few chunks (measured
 * on a 2-core VM; the planner then cost as much as copying 3 MB). The order and merging are
 * those of layer_plan._plan_numpy, which the tests hold this to: fragments ordered chunk, K/V,
 * page; a chunk's consecutive pages (every one but the last full) form one run; a run continues
 * the previous one where both sides, the slot storage and the layer stride all continue it. */
typedef struct {
    uint64_t pool, slot, size, store, step; /* layer 0's pool offset and slot address; the slot's layer stride */
} PlanRun;

static int item_u64(PyObject *seq, Py_ssize_t i, uint64_t *out) {
    *out = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

/* The pages of chunk `c` if it is a tuple (ids, lens, ...) of 7 items with ids and lens lists or
 * tuples of one length, else -1 with ValueError. */
static Py_ssize_t chunk_pages(PyObject *c) {
    PyObject *ids = PyTuple_Check(c) && PyTuple_GET_SIZE(c) == 7 ? PyTuple_GET_ITEM(c, 0) : NULL;
    if (ids == NULL) {
        PyErr_SetString(PyExc_ValueError, "chunks: expected tuples (ids, lens, ptr, base, layer_step, kv_step, kvs)");
        return -1;
    }
    PyObject *lens = PyTuple_GET_ITEM(c, 1);
    if (!(PyList_Check(ids) || PyTuple_Check(ids)) || !(PyList_Check(lens) || PyTuple_Check(lens))
        || PySequence_Fast_GET_SIZE(ids) != PySequence_Fast_GET_SIZE(lens)) {
        PyErr_SetString(PyExc_ValueError, "chunks: expected ids and lens as lists or tuples of one length");
        return -1;
    }
    return PySequence_Fast_GET_SIZE(ids);
}

/* Append chunk `c` (checked by chunk_pages) to runs: its pages grouped into runs contiguous on both
 * sides, emitted for K (and V), each merged into the previous run where both sides continue it. */
static int plan_chunk(PyObject *c, PyObject *index, uint64_t page_size, uint64_t row, uint64_t kv_stride,
                      PlanRun *runs, Py_ssize_t *num_runs, uint64_t (*pages)[3], Py_ssize_t *pairs) {
    uint64_t ptr, layer_step, slot_kv, kvs, store;
    PyObject *st = PyDict_GetItemWithError(index, PyTuple_GET_ITEM(c, 3));
    if (st == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "chunks: a slot storage base missing from index");
        return -1;
    }
    if ((store = PyLong_AsUnsignedLongLong(st)) == (uint64_t)-1 && PyErr_Occurred()) return -1;
    PyObject *ids = PyTuple_GET_ITEM(c, 0), *lens = PyTuple_GET_ITEM(c, 1);
    if (item_u64(c, 2, &ptr) || item_u64(c, 4, &layer_step) || item_u64(c, 5, &slot_kv) || item_u64(c, 6, &kvs)) return -1;
    if (kvs != 1 && kvs != 2) { /* the runs buffer holds two runs per page */
        PyErr_Format(PyExc_ValueError, "chunks: kvs=%llu, expected 1 (K only) or 2 (K and V)", (unsigned long long)kvs);
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ids), k = 0, used = 0;
    uint64_t start = 0, follow = 0;
    int follows = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t page, tokens;
        if (item_u64(ids, j, &page) || item_u64(lens, j, &tokens)) return -1;
        if (tokens) {
            used++;
            if (follows && page == follow) {
                pages[k - 1][2] += tokens;
            } else {
                pages[k][0] = page, pages[k][1] = start, pages[k][2] = tokens;
                k++;
            }
            follows = tokens == page_size;
            follow = page + 1;
        }
        start += tokens;
    }
    *pairs += used * (Py_ssize_t)kvs;
    for (uint64_t kv = 0; kv < kvs; kv++) {
        for (Py_ssize_t j = 0; j < k; j++) {
            PlanRun f = {kv * kv_stride + pages[j][0] * page_size * row, ptr + kv * slot_kv + pages[j][1] * row,
                         pages[j][2] * row, store, layer_step};
            PlanRun *r = *num_runs ? &runs[*num_runs - 1] : NULL;
            if (r && r->pool + r->size == f.pool && r->slot + r->size == f.slot && r->store == f.store
                && r->step == f.step) {
                r->size += f.size;
            } else {
                runs[(*num_runs)++] = f;
            }
        }
    }
    return 0;
}

static PyObject *plan_runs(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *chunks, *bases_obj, *index;
    unsigned long long page_size, row, kv_stride;
    int to_slot;
    if (!PyArg_ParseTuple(args, "OOO!KKKp:plan_runs", &chunks, &bases_obj, &PyDict_Type, &index, &page_size, &row,
                          &kv_stride, &to_slot)) {
        return NULL;
    }
    if (!PyList_Check(chunks)) return PyErr_Format(PyExc_ValueError, "chunks: expected a list");
    Py_buffer bases;
    if (address_buffer(bases_obj, "pool_bases", &bases) != 0) return NULL;
    Py_ssize_t num_chunks = PyList_GET_SIZE(chunks), bound = 0, num_runs = 0, pairs = 0, layers = bases.len / 8;
    for (Py_ssize_t c = 0; c < num_chunks; c++) {
        Py_ssize_t n = chunk_pages(PyList_GET_ITEM(chunks, c));
        if (n < 0) {
            PyBuffer_Release(&bases);
            return NULL;
        }
        bound += n;
    }
    PlanRun *runs = PyMem_Malloc(sizeof(PlanRun) * (size_t)(2 * bound + 1));
    uint64_t (*pages)[3] = PyMem_Malloc(sizeof(*pages) * (size_t)(bound + 1));
    PyObject *out = NULL;
    if (runs == NULL || pages == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t c = 0; c < num_chunks; c++) {
        if (plan_chunk(PyList_GET_ITEM(chunks, c), index, page_size, row, kv_stride, runs, &num_runs, pages, &pairs)) goto done;
    }
    /* rows: src [L, R], dst [L, R], sizes [R], src storage index [R], dst storage index [R] */
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)sizeof(uint64_t) * (2 * layers + 3) * num_runs);
    if (out == NULL) goto done;
    uint64_t *a = (uint64_t *)PyByteArray_AS_STRING(out), *base = bases.buf, R = (uint64_t)num_runs;
    uint64_t *pool_rows = to_slot ? a : a + layers * R, *slot_rows = to_slot ? a + layers * R : a;
    uint64_t *sizes = a + 2 * layers * R, *pool_store = sizes + (to_slot ? R : 2 * R), *slot_store = sizes + (to_slot ? 2 * R : R);
    for (Py_ssize_t l = 0; l < layers; l++) {
        for (uint64_t r = 0; r < R; r++) {
            pool_rows[l * R + r] = base[l] + runs[r].pool;
            slot_rows[l * R + r] = runs[r].slot + (uint64_t)l * runs[r].step;
        }
    }
    uint64_t total = 0;
    for (uint64_t r = 0; r < R; r++) {
        sizes[r] = runs[r].size, pool_store[r] = 0, slot_store[r] = runs[r].store;
        total += runs[r].size;
    }
done:
    PyMem_Free(runs);
    PyMem_Free(pages);
    PyBuffer_Release(&bases);
    return out == NULL ? NULL : Py_BuildValue("(NnnK)", out, num_runs, pairs, (unsigned long long)total);
}

static PyMethodDef methods[] = {
    {"copy_runs", copy_runs, METH_VARARGS,
     "copy_runs(src, dst, sizes, threads, stream_min=-1): copy sizes[i % len(sizes)] bytes from address src[i] "
     "to dst[i] for every i (contiguous uint64 buffers; src and dst of one length, a multiple of len(sizes); "
     "runs must not overlap), on up to `threads` threads, without the GIL; streaming stores for a job of at "
     "least stream_min bytes (-1: STREAM_MIN_BYTES)."},
    {"plan_runs", plan_runs, METH_VARARGS,
     "plan_runs(chunks, pool_bases, index, page_size, row, kv_stride, to_slot): the runs of layer_plan's "
     "compiled builder as (bytearray of uint64 rows src [L, R], dst [L, R], sizes, src store, dst store; R; pairs; "
     "bytes of one layer). "
     "chunks: [(page ids, page lens, slot ptr, slot storage base, layer step, kv step, 1 or 2 (K only or K and V))]"
     ", checked by the caller; index: storage base -> its index in each layer's storage table."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_host_copy", .m_doc = "The CPU transfer engine's copy loop.", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__host_copy(void) {
    static int registered;
    if (!registered && pthread_atfork(NULL, NULL, after_fork_in_child) == 0) registered = 1;
    stream_min_bytes = cache_stream_threshold();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "MAX_THREADS", MAX_THREADS) != 0
                      || PyModule_AddIntConstant(m, "STREAM_MIN_BYTES", (long)stream_min_bytes) != 0
                      || PyModule_AddIntConstant(m, "STREAM_STORES", HAVE_STREAM_STORES) != 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
