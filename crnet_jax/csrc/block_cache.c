/* A cache of XLA's large memory blocks, preloaded (LD_PRELOAD) into the command-line entry
 * points by crnet_jax/host_memory.py.
 *
 * XLA:CPU allocates an executable's temporaries as one block each time it runs (2.87 GB for
 * a training step of the lung network at 300 x 340, batch 8) and frees it at the end. glibc
 * maps such a block afresh and unmaps it on free, so every step faults all of it in again;
 * on a VM whose kernel hands freed memory back to its host that costs up to 1.4 s of system
 * time per 2 s step. Here the aligned allocations XLA makes (posix_memalign, aligned_alloc,
 * memalign) of LARGE_BYTES or more come from mmap'd, 2 MiB-aligned blocks backed by
 * transparent huge pages (madvise), and when one is freed it stays mapped as a spare: the
 * next large request that fits is served from it with no fault at all.
 *
 * Memory bound: freed blocks stay mapped as spares, and a request takes the smallest spare
 * that holds it (a step with several large buffers finds each again). Before a new block
 * is mapped, spares are unmapped (largest first) until the blocks in use, the spares and
 * the new block together fit under the high-water mark of bytes in use at once (counting
 * the new block). So resident memory never exceeds the most that was in use at one time.
 * In a loop of steps (or of steps and validation passes, whose blocks are smaller) the
 * process maps the step's blocks once and reuses them.
 *
 * A step's block is freed by XLA's thread a moment after the step's outputs are ready, so
 * a loop that dispatches the next step as soon as the previous one is done can ask for a
 * block before the last one is back: it would map a second block, and raise the
 * high-water mark by one. crnet_block_cache_settle(n) waits (bounded) until no more than n
 * blocks are in use; the training loop calls it between steps on CPU.
 *
 * Everything else (malloc, calloc, small aligned requests, and glibc's own blocks) goes to
 * glibc untouched; free, realloc and malloc_usable_size recognise our blocks by address.
 * glibc only (it forwards to __libc_memalign and friends).
 *
 * Set CRNET_BLOCK_CACHE_LOG=1 to print each map, reuse and unmap to stderr.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

extern void *__libc_memalign(size_t alignment, size_t size);
extern void *__libc_malloc(size_t size);
extern void __libc_free(void *ptr);
extern void *__libc_realloc(void *ptr, size_t size);

#define EXPORT __attribute__((visibility("default")))
#define LARGE_BYTES ((size_t)64 << 20) /* requests from here on are ours */
#define HUGE_PAGE ((size_t)2 << 20)
#define MAX_BLOCKS 64 /* live blocks tracked; beyond that requests go to glibc */

enum { EMPTY = 0, IN_USE = 1, SPARE = 2 };

typedef struct {
  _Atomic(uintptr_t) addr; /* nonzero while mapped (IN_USE or SPARE) */
  size_t bytes;
  int state;
} Block;

static Block blocks[MAX_BLOCKS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t returned = PTHREAD_COND_INITIALIZER; /* signalled when a block is freed */
static _Atomic(unsigned long long) n_mapped, n_reused, n_unmapped;
static size_t high_water; /* most bytes in use at once; under the lock */
static int log_events;
static size_t (*glibc_usable_size)(void *);

static void note(const char *what, size_t bytes, size_t request) {
  if (!log_events) return;
  char line[128]; /* snprintf of integers allocates nothing */
  int n = snprintf(line, sizeof line, "[crnet block cache] %s %zu MiB (request %zu MiB)\n", what,
                   bytes >> 20, request >> 20);
  if (n > 0) (void)!write(2, line, (size_t)n);
}

static void lock_for_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void init(void) {
  const char *v = getenv("CRNET_BLOCK_CACHE_LOG");
  log_events = v != NULL && v[0] != '\0' && v[0] != '0';
  glibc_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
}

/* A 2 MiB-aligned mapping of `bytes` (a multiple of 2 MiB), asking for huge pages. */
static void *map_aligned(size_t bytes) {
  size_t len = bytes + HUGE_PAGE;
  char *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  uintptr_t start = ((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
  size_t head = start - (uintptr_t)raw, tail = len - head - bytes;
  if (head) munmap(raw, head);
  if (tail) munmap((char *)start + bytes, tail);
  madvise((void *)start, bytes, MADV_HUGEPAGE); /* a hint: without THP it changes nothing */
  return (void *)start;
}

/* Forget block i and unmap it; the caller holds the lock. The address is cleared before the
 * unmap so that no later mapping at the same address is ever taken for ours. */
static void drop_locked(int i) {
  void *addr = (void *)atomic_load(&blocks[i].addr);
  size_t bytes = blocks[i].bytes;
  atomic_store(&blocks[i].addr, 0);
  blocks[i].state = EMPTY;
  blocks[i].bytes = 0;
  munmap(addr, bytes);
  atomic_fetch_add(&n_unmapped, 1);
  note("unmapped", bytes, 0);
}

/* A block of at least `size` bytes, or NULL (then glibc serves the request). */
static void *take_block(size_t size) {
  if (size > SIZE_MAX - HUGE_PAGE) return NULL;
  size_t bytes = (size + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  pthread_mutex_lock(&lock);
  int best = -1, empty = -1;
  size_t in_use = 0, spares = 0;
  for (int i = 0; i < MAX_BLOCKS; i++) {
    if (blocks[i].state == IN_USE) in_use += blocks[i].bytes;
    else if (blocks[i].state == SPARE) {
      spares += blocks[i].bytes;
      if (blocks[i].bytes >= bytes && (best < 0 || blocks[i].bytes < blocks[best].bytes)) best = i;
    } else if (empty < 0) {
      empty = i;
    }
  }
  if (best >= 0) {
    blocks[best].state = IN_USE;
    void *addr = (void *)atomic_load(&blocks[best].addr);
    size_t have = blocks[best].bytes;
    pthread_mutex_unlock(&lock);
    atomic_fetch_add(&n_reused, 1);
    note("reused", have, size);
    return addr;
  }
  if (in_use + bytes > high_water) high_water = in_use + bytes;
  while (spares > 0 && in_use + spares + bytes > high_water) { /* unmap spares, largest first */
    int largest = -1;
    for (int i = 0; i < MAX_BLOCKS; i++)
      if (blocks[i].state == SPARE && (largest < 0 || blocks[i].bytes > blocks[largest].bytes)) largest = i;
    spares -= blocks[largest].bytes;
    drop_locked(largest);
    if (empty < 0) empty = largest;
  }
  void *addr = empty >= 0 ? map_aligned(bytes) : NULL;
  if (addr != NULL) {
    blocks[empty].bytes = bytes;
    blocks[empty].state = IN_USE;
    atomic_store(&blocks[empty].addr, (uintptr_t)addr);
    atomic_fetch_add(&n_mapped, 1);
  }
  pthread_mutex_unlock(&lock);
  if (addr != NULL) note("mapped", bytes, size);
  return addr;
}

/* The index of our block at `ptr`, or -1. Lock-free: a live pointer's entry cannot change
 * under its owner, and glibc's pointers are never our addresses while those are mapped. */
static int find_block(const void *ptr) {
  uintptr_t p = (uintptr_t)ptr;
  if (p == 0 || (p & (HUGE_PAGE - 1)) != 0) return -1;
  for (int i = 0; i < MAX_BLOCKS; i++)
    if (atomic_load(&blocks[i].addr) == p) return i;
  return -1;
}

static int in_use_locked(void) {
  int n = 0;
  for (int j = 0; j < MAX_BLOCKS; j++) n += blocks[j].state == IN_USE;
  return n;
}

/* Block i is freed: it stays mapped as a spare. */
static void return_block(int i) {
  pthread_mutex_lock(&lock);
  blocks[i].state = SPARE;
  pthread_cond_broadcast(&returned);
  pthread_mutex_unlock(&lock);
}

static int is_power_of_two(size_t x) { return x != 0 && (x & (x - 1)) == 0; }

EXPORT int posix_memalign(void **out, size_t alignment, size_t size) {
  if (!is_power_of_two(alignment) || alignment % sizeof(void *) != 0) return EINVAL;
  void *p = NULL;
  if (size >= LARGE_BYTES && alignment <= HUGE_PAGE) p = take_block(size);
  if (p == NULL) p = __libc_memalign(alignment, size);
  if (p == NULL) return ENOMEM;
  *out = p;
  return 0;
}

EXPORT void *aligned_alloc(size_t alignment, size_t size) {
  if (size >= LARGE_BYTES && is_power_of_two(alignment) && alignment <= HUGE_PAGE) {
    void *p = take_block(size);
    if (p != NULL) return p;
  }
  return __libc_memalign(alignment, size);
}

EXPORT void *memalign(size_t alignment, size_t size) { return aligned_alloc(alignment, size); }

EXPORT void free(void *ptr) {
  int i = find_block(ptr);
  if (i >= 0) return_block(i);
  else __libc_free(ptr);
}

/* C23's sized frees (glibc 2.41+): ours must not reach glibc's. */
EXPORT void free_sized(void *ptr, size_t size) { (void)size; free(ptr); }
EXPORT void free_aligned_sized(void *ptr, size_t alignment, size_t size) {
  (void)alignment;
  (void)size;
  free(ptr);
}

EXPORT void *realloc(void *ptr, size_t size) {
  int i = find_block(ptr);
  if (i < 0) return __libc_realloc(ptr, size);
  if (size == 0) { /* as glibc: free it, return NULL */
    return_block(i);
    return NULL;
  }
  if (size <= blocks[i].bytes) return ptr; /* it still fits where it is */
  void *moved = __libc_malloc(size);
  if (moved == NULL) return NULL; /* the old block stays valid, as realloc promises */
  memcpy(moved, ptr, blocks[i].bytes);
  return_block(i);
  return moved;
}

EXPORT void *reallocarray(void *ptr, size_t n, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(ptr, total);
}

EXPORT size_t malloc_usable_size(void *ptr) {
  int i = find_block(ptr);
  if (i >= 0) return blocks[i].bytes;
  return glibc_usable_size != NULL ? glibc_usable_size(ptr) : 0;
}

/* For crnet_jax.host_memory (ctypes): counts of blocks mapped, requests served by a spare,
 * blocks unmapped; bytes the spares hold now, blocks in use now, and the high-water mark
 * of bytes in use at once. */
EXPORT void crnet_block_cache_stats(unsigned long long out[6]) {
  out[0] = atomic_load(&n_mapped);
  out[1] = atomic_load(&n_reused);
  out[2] = atomic_load(&n_unmapped);
  pthread_mutex_lock(&lock);
  unsigned long long spare = 0;
  for (int i = 0; i < MAX_BLOCKS; i++)
    if (blocks[i].state == SPARE) spare += blocks[i].bytes;
  out[4] = (unsigned long long)in_use_locked();
  out[5] = high_water;
  pthread_mutex_unlock(&lock);
  out[3] = spare;
}

/* Wait until at most `in_use` blocks of ours are in use, for at most timeout_us
 * microseconds; returns how many are. */
EXPORT int crnet_block_cache_settle(int in_use, unsigned int timeout_us) {
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_sec += timeout_us / 1000000u;
  deadline.tv_nsec += (long)(timeout_us % 1000000u) * 1000L;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec += 1;
    deadline.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&lock);
  int busy;
  while ((busy = in_use_locked()) > in_use)
    if (pthread_cond_timedwait(&returned, &lock, &deadline) == ETIMEDOUT) {
      busy = in_use_locked();
      break;
    }
  pthread_mutex_unlock(&lock);
  return busy;
}

/* Unmap the spares now (e.g. when a long-running program is done with its big steps);
 * returns the bytes released. */
EXPORT unsigned long long crnet_block_cache_release(void) {
  unsigned long long released = 0;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_BLOCKS; i++)
    if (blocks[i].state == SPARE) {
      released += blocks[i].bytes;
      drop_locked(i);
    }
  pthread_mutex_unlock(&lock);
  return released;
}
