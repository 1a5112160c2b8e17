/*
 * lookup: a real-resolver load client for dnsguard's benchmark (bench/realclients.py).
 *
 * Why C: the Python probe imitates glibc's wire pattern but is not glibc, and it is not musl.
 * This calls the C library's own getaddrinfo(AF_UNSPEC, SOCK_STREAM) from N threads, each
 * closed-loop, so what it measures is what a pod's resolver does: glibc's parallel A+AAAA on
 * one socket, 5 s retransmit, resolv.conf search list and ndots; or, built with
 * `musl-gcc -static`, musl's (Alpine's) parallel queries and 2.5 s retransmit. The same
 * source serves both; which libc it was built against is reported from the preprocessor.
 *
 *   lookup --threads N --seconds S --names a,b,c [--start-at EPOCH] [--grace G] [--label L]
 *
 * Bounded: no lookup starts after S seconds; G seconds after that (default 30) the process
 * prints what it has, counting lookups still in getaddrinfo as "unfinished", and exits
 * without waiting for them (_exit). Output: one JSON line on stdout with counts and a
 * log-scale latency histogram (100 bins per decade of microseconds, sparse [upper_us, count]
 * pairs) that the host merges exactly across pods.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if defined(__GLIBC__)
#define LIBC_KIND "glibc"
#else
#define LIBC_KIND "musl"
#endif

#define BINS_PER_DECADE 100
#define NBINS (BINS_PER_DECADE * 9) /* 1 us .. 1000 s */
#define MAX_THREADS 1024
#define MAX_NAMES 4096
#define NERR 16

struct tally {
    long lookups, failed, ge_1s, ge_5s;
    long max_us;
    long errors[NERR]; /* by -EAI code, clamped */
    long hist[NBINS];
};

static struct tally tallies[MAX_THREADS];
static atomic_int busy[MAX_THREADS]; /* a lookup is in getaddrinfo */
static atomic_int done_threads;
static char *names[MAX_NAMES];
static int nnames, nthreads;
static double seconds, grace = 30.0;
static struct timespec t0;

static double since(const struct timespec *a) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - a->tv_sec) + (double)(now.tv_nsec - a->tv_nsec) / 1e9;
}

static int bin_of(long us) {
    if (us < 1) return 0;
    int b = (int)floor(log10((double)us) * BINS_PER_DECADE);
    return b < 0 ? 0 : (b >= NBINS ? NBINS - 1 : b);
}

static void *worker(void *arg) {
    long id = (long)arg;
    struct tally *t = &tallies[id];
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    for (long i = id; since(&t0) < seconds; i += nthreads) {
        struct timespec start;
        struct addrinfo *res = NULL;
        clock_gettime(CLOCK_MONOTONIC, &start);
        atomic_store(&busy[id], 1);
        int rc = getaddrinfo(names[i % nnames], NULL, &hints, &res);
        double took = since(&start);
        atomic_store(&busy[id], 0);
        if (res) freeaddrinfo(res);
        long us = (long)(took * 1e6);
        t->lookups++;
        if (rc != 0) {
            t->failed++;
            int code = rc < 0 ? -rc : rc;
            t->errors[code < NERR ? code : NERR - 1]++;
        } else {
            t->hist[bin_of(us)]++;
        }
        if (took >= 1.0) t->ge_1s++;
        if (took >= 5.0) t->ge_5s++;
        if (us > t->max_us) t->max_us = us;
    }
    atomic_fetch_add(&done_threads, 1);
    return NULL;
}

static void report(const char *label, double elapsed) {
    struct tally sum;
    memset(&sum, 0, sizeof sum);
    int unfinished = 0;
    for (int i = 0; i < nthreads; i++) {
        struct tally *t = &tallies[i];
        sum.lookups += t->lookups;
        sum.failed += t->failed;
        sum.ge_1s += t->ge_1s;
        sum.ge_5s += t->ge_5s;
        if (t->max_us > sum.max_us) sum.max_us = t->max_us;
        for (int e = 0; e < NERR; e++) sum.errors[e] += t->errors[e];
        for (int b = 0; b < NBINS; b++) sum.hist[b] += t->hist[b];
        unfinished += atomic_load(&busy[i]);
    }
    printf("{\"kind\":\"%s\",\"label\":\"%s\",\"threads\":%d,\"seconds\":%.3f,"
           "\"elapsed\":%.3f,\"lookups\":%ld,\"failed\":%ld,\"ge_1s\":%ld,\"ge_5s\":%ld,"
           "\"unfinished\":%d,\"max_us\":%ld,\"bins_per_decade\":%d,\"errors\":{",
           LIBC_KIND, label, nthreads, seconds, elapsed, sum.lookups, sum.failed, sum.ge_1s,
           sum.ge_5s, unfinished, sum.max_us, BINS_PER_DECADE);
    int first = 1;
    for (int e = 1; e < NERR; e++) {
        if (!sum.errors[e]) continue;
        printf("%s\"%d\":%ld", first ? "" : ",", -e, sum.errors[e]);
        first = 0;
    }
    printf("},\"hist\":[");
    first = 1;
    for (int b = 0; b < NBINS; b++) {
        if (!sum.hist[b]) continue;
        /* upper edge of bin b in microseconds */
        double upper = pow(10.0, (double)(b + 1) / BINS_PER_DECADE);
        printf("%s[%.1f,%ld]", first ? "" : ",", upper, sum.hist[b]);
        first = 0;
    }
    printf("]}\n");
    fflush(stdout);
}

static void usage(void) {
    fprintf(stderr, "usage: lookup --threads N --seconds S --names a,b,c "
                    "[--start-at EPOCH] [--grace G] [--label L]\n");
    exit(2);
}

static int bad(const char *flag, const char *value) {
    fprintf(stderr, "lookup: bad %s: %s\n", flag, value);
    exit(2);
}

int main(int argc, char **argv) {
    double start_at = 0.0;
    const char *label = "";
    char *namelist = NULL;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        char *end;
        if (!strcmp(flag, "--threads")) {
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > MAX_THREADS) bad(flag, v);
            nthreads = (int)n;
        } else if (!strcmp(flag, "--seconds")) {
            seconds = strtod(v, &end);
            if (*end || !(seconds > 0 && seconds <= 3600)) bad(flag, v);
        } else if (!strcmp(flag, "--grace")) {
            grace = strtod(v, &end);
            if (*end || !(grace >= 0 && grace <= 600)) bad(flag, v);
        } else if (!strcmp(flag, "--start-at")) {
            start_at = strtod(v, &end);
            if (*end || start_at < 0) bad(flag, v);
        } else if (!strcmp(flag, "--label")) {
            for (const char *c = v; *c; c++)
                if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20) bad(flag, v);
            label = v;
        } else if (!strcmp(flag, "--names")) {
            namelist = strdup(v);
        } else {
            usage();
        }
    }
    if (!nthreads || seconds <= 0 || !namelist) usage();
    for (char *tok = strtok(namelist, ","); tok; tok = strtok(NULL, ",")) {
        if (nnames >= MAX_NAMES) bad("--names", "too many");
        names[nnames++] = tok;
    }
    if (!nnames) bad("--names", "empty");

    if (start_at > 0) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        double wait = start_at - ((double)now.tv_sec + (double)now.tv_nsec / 1e9);
        if (wait > 60) wait = 60; /* a clock far in the future is a bug, not a reason to hang */
        if (wait > 0) {
            struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
            while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024); /* musl's 128 KiB default is tight */
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (long i = 0; i < nthreads; i++) {
        pthread_t th;
        if (pthread_create(&th, &attr, worker, (void *)i) != 0) {
            fprintf(stderr, "lookup: pthread_create failed\n");
            _exit(1);
        }
    }
    while (atomic_load(&done_threads) < nthreads && since(&t0) < seconds + grace) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    report(label, since(&t0));
    _exit(0); /* never wait for a lookup still inside getaddrinfo */
}
