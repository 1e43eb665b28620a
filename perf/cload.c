/* cload: the load generator of perf/loadgen.py in C, so the client's own CPU stays small.

       gcc -O2 -o perf/build/cload perf/cload.c        (perf/cload.py builds it on demand)
       perf/build/cload --target 127.0.0.1:7001 -c 50 -d 16 -b 64 -t 5 [-p 2]

   Same semantics as loadgen.py, and one JSON object on stdout with the keys of loadgen.run()'s
   result (config, requests, elapsed_s, req_per_s, bytes_per_s, latency_ms{p50,p99,p99.9,
   samples}, errors, error_samples, client_cpu_s, connect_s, client_cpu_cores):

   - Each connection's requests are precomputed in a ring of K packets (K >= 2*D; seq_num
     counting up with period K from a random base, a user_id per ring, random body slices);
     rings are sized and shared as loadgen.ring_plan does. The echo reply of a request is the
     request itself, so every received byte is compared (memcmp) with the expected position
     of the connection's request stream: seq order, cmd_id, status 0, user_id and body.
   - D requests in flight per connection: D at first, then as r replies complete, r more in
     one write (writev of the ring, wrapping).
   - A mismatch, or bytes beyond the requests written, is counted, the first few are
     described field by field, and the connection is closed. A connection closed by the
     server counts as an error. After the window no new requests go out; replies still
     missing after --drain-timeout seconds are errors.
   - Latency is sampled: one tracked request per connection at a time (the last of a write).
   - Single-threaded epoll; -p P forks P processes that split the connections and measure the
     same window (--start-at, CLOCK_MONOTONIC seconds = Python's time.monotonic()).

   Exit status: 0, 1 if any error was counted, 2 if the run could not be done (message on
   stderr, no JSON). */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 18
#define RING_BYTES (256 * 1024)
#define RING_BUDGET (64LL * 1024 * 1024)
#define MAX_ERROR_SAMPLES 5
#define SAMPLE_LEN 240
#define READ_BUF (256 * 1024)
#define MAX_EVENTS 1024
#define CONNECTS_IN_PROGRESS 16
#define CONNECT_TIMEOUT 60.0

struct config {
    char host[256];
    int port;
    int connections;
    int depth;
    int body;
    double duration;
    double warmup;
    int cmd_id;
    int processes;
    double start_at; /* < 0: now + 0.2 * processes + warmup */
    double drain_timeout;
};

/* What one process measured; written whole (plus latencies) to the parent. */
struct part {
    int failed;
    char failure[SAMPLE_LEN];
    uint64_t completed;
    double connect_s;
    double elapsed;
    uint64_t errors;
    uint64_t closed_early;
    double cpu;
    uint64_t n_latencies;
    int n_samples;
    char samples[MAX_ERROR_SAMPLES][SAMPLE_LEN];
};

struct conn {
    int fd;
    const uint8_t *ring;
    uint64_t ring_len;
    uint64_t sent;      /* requests committed (written or queued for writing) */
    uint64_t written;   /* request bytes written to the socket */
    uint64_t received;  /* reply bytes received and verified */
    int64_t track_index; /* request number whose send time is track_time; -1: none */
    double track_time;
    int connected, bad, done, want_out;
};

/* Process state ----------------------------------------------------------------------- */

static struct config cfg;
static uint64_t pkt;
static int epfd = -1;
static struct conn *conns;
static int n_conns;
static int n_done;
static int measuring, stopping;
static double *latencies;
static uint64_t n_latencies, cap_latencies;
static struct part result;
static uint8_t *read_buf;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cload: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void sample(const char *fmt, ...) {
    if (result.n_samples >= MAX_ERROR_SAMPLES)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(result.samples[result.n_samples++], SAMPLE_LEN, fmt, ap);
    va_end(ap);
}

/* splitmix64: good enough for random bodies and seq bases. */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void put_u32(uint8_t *p, uint32_t v) {
    p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}
static void put_u16(uint8_t *p, uint16_t v) {
    p[0] = v; p[1] = v >> 8;
}
static uint32_t get_u32(const uint8_t *p) {
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Requests ----------------------------------------------------------------------------- */

/* K back-to-back request packets (loadgen.build_ring); returns the ring, K in *count. */
static uint8_t *build_ring(uint32_t user_id, uint64_t ring_bytes, uint64_t *count) {
    uint64_t k = ring_bytes / pkt;
    if (k < 2 * (uint64_t)cfg.depth) k = 2 * (uint64_t)cfg.depth;
    if (k < 2) k = 2;
    size_t pool_len = (size_t)cfg.body + 4096;
    uint8_t *pool = malloc(pool_len);
    uint8_t *ring = malloc(k * pkt);
    if (!pool || !ring)
        die("out of memory for a %llu-byte ring", (unsigned long long)(k * pkt));
    for (size_t i = 0; i < pool_len; i += 8) {
        uint64_t r = rng_next();
        memcpy(pool + i, &r, pool_len - i < 8 ? pool_len - i : 8);
    }
    uint32_t seq_base = (uint32_t)rng_next();
    for (uint64_t i = 0; i < k; i++) {
        uint8_t *p = ring + i * pkt;
        put_u32(p, (uint32_t)pkt);
        put_u32(p + 4, seq_base + (uint32_t)i);
        put_u16(p + 8, (uint16_t)cfg.cmd_id);
        put_u32(p + 10, 0);
        put_u32(p + 14, user_id);
        memcpy(p + HEADER_SIZE, pool + rng_next() % 4096, (size_t)cfg.body);
    }
    free(pool);
    *count = k;
    return ring;
}

/* loadgen.ring_plan: (ring bytes per connection, distinct rings) within the budget. */
static void ring_plan(int connections, uint64_t *ring_bytes, int *rings) {
    uint64_t per = (uint64_t)RING_BUDGET / (uint64_t)connections;
    uint64_t bytes = per < RING_BYTES ? per : RING_BYTES;
    uint64_t minimum = 2 * (uint64_t)cfg.depth * pkt;
    if (bytes < minimum) bytes = minimum;
    uint64_t n = (uint64_t)RING_BUDGET / bytes;
    if (n > (uint64_t)connections) n = connections;
    if (n < 1) n = 1;
    *ring_bytes = bytes;
    *rings = (int)n;
}

static void raise_open_files(int need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= (rlim_t)need)
        return;
    rl.rlim_cur = (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (rlim_t)need) ? (rlim_t)need : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

/* One connection ---------------------------------------------------------------------- */

static void set_events(struct conn *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void mark_done(struct conn *c) {
    if (!c->done) {
        c->done = 1;
        n_done++;
    }
}

static void close_conn(struct conn *c) {
    if (c->fd >= 0) {
        close(c->fd); /* also leaves the epoll set */
        c->fd = -1;
    }
}

/* The server closed the connection (or it broke). */
static void lost(struct conn *c) {
    if (!c->done) {
        if (!stopping || c->received / pkt < c->sent)
            result.closed_early++;
        mark_done(c);
    }
    close_conn(c);
}

/* Write what is committed but not yet written: at most D packets, so at most 2 ring pieces. */
static void flush(struct conn *c) {
    uint64_t target = c->sent * pkt;
    while (c->written < target) {
        uint64_t off = c->written % c->ring_len, left = target - c->written;
        uint64_t first = c->ring_len - off < left ? c->ring_len - off : left;
        struct iovec iov[2] = {{(void *)(c->ring + off), first}, {(void *)c->ring, left - first}};
        ssize_t n = writev(c->fd, iov, left > first ? 2 : 1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->want_out)
                    set_events(c, 1);
                return;
            }
            lost(c);
            return;
        }
        c->written += (uint64_t)n;
    }
    if (c->want_out)
        set_events(c, 0);
}

static void send_requests(struct conn *c, uint64_t count) {
    c->sent += count;
    flush(c);
    if (c->track_index < 0) {
        c->track_index = (int64_t)c->sent - 1;
        c->track_time = now();
    }
}

static const char *const FIELD_NAMES[5] = {"pkg_len", "seq_num", "cmd_id", "status", "user_id"};
static const int FIELD_OFF[5] = {0, 4, 8, 10, 14};
static const int FIELD_SIZE[5] = {4, 4, 2, 4, 4};

/* loadgen.describe_mismatch for `len` bytes of one reply packet (len < pkt: a partial one). */
static void describe(char *out, size_t size, const uint8_t *got, const uint8_t *want, uint64_t len) {
    size_t used = 0;
    out[0] = 0;
#define ADD(...) used += (size_t)snprintf(out + used, used < size ? size - used : 0, __VA_ARGS__)
    for (int f = 0; f < 5; f++) {
        if ((uint64_t)(FIELD_OFF[f] + FIELD_SIZE[f]) > len) {
            if ((uint64_t)FIELD_OFF[f] < len && memcmp(got + FIELD_OFF[f], want + FIELD_OFF[f],
                                                       len - FIELD_OFF[f]) != 0)
                ADD("%s%s differs (partial)", used ? ", " : "", FIELD_NAMES[f]);
            continue;
        }
        uint32_t g = FIELD_SIZE[f] == 4 ? get_u32(got + FIELD_OFF[f]) : (uint32_t)(got[8] | got[9] << 8);
        uint32_t w = FIELD_SIZE[f] == 4 ? get_u32(want + FIELD_OFF[f]) : (uint32_t)(want[8] | want[9] << 8);
        if (g != w)
            ADD("%s%s %u != %u", used ? ", " : "", FIELD_NAMES[f], g, w);
    }
    if (len > HEADER_SIZE && memcmp(got + HEADER_SIZE, want + HEADER_SIZE, len - HEADER_SIZE) != 0)
        ADD("%sbody differs", used ? ", " : "");
    if (!used)
        ADD("unknown difference");
    if (len < pkt)
        ADD(" (first %llu of %llu bytes)", (unsigned long long)len, (unsigned long long)pkt);
#undef ADD
}

/* A byte-exact mismatch somewhere in data (n bytes at stream offset start): count and
   describe every bad reply packet, then give up on the connection (loadgen's fail). */
static void fail(struct conn *c, const uint8_t *data, uint64_t n, uint64_t start) {
    uint64_t head = start % pkt, first = start - head, total = head + n, bad = 0;
    uint8_t *got = malloc(pkt);
    if (!got)
        die("out of memory");
    for (uint64_t pos = 0; pos < total; pos += pkt) {
        uint64_t len = total - pos < pkt ? total - pos : pkt;
        const uint8_t *want = c->ring + (first + pos) % c->ring_len; /* K*pkt: never wraps inside */
        for (uint64_t i = 0; i < len; i++) /* the first `head` bytes already matched */
            got[i] = pos + i < head ? want[i] : data[pos + i - head];
        if (memcmp(got, want, len) != 0) {
            bad++;
            if (result.n_samples < MAX_ERROR_SAMPLES) {
                char text[SAMPLE_LEN];
                describe(text, sizeof text, got, want, len);
                sample("reply #%llu: %s", (unsigned long long)((first + pos) / pkt), text);
            }
        }
    }
    free(got);
    result.errors += bad ? bad : 1;
    /* The stream may be out of step from here on: stop this connection. */
    c->bad = 1;
    mark_done(c);
    close_conn(c);
}

static int stream_equal(const struct conn *c, uint64_t start, const uint8_t *data, uint64_t n) {
    uint64_t pos = start % c->ring_len;
    while (n) {
        uint64_t chunk = c->ring_len - pos < n ? c->ring_len - pos : n;
        if (memcmp(c->ring + pos, data, chunk) != 0)
            return 0;
        data += chunk;
        n -= chunk;
        pos = 0;
    }
    return 1;
}

static void push_latency(double seconds) {
    if (n_latencies == cap_latencies) {
        cap_latencies = cap_latencies ? 2 * cap_latencies : 65536;
        latencies = realloc(latencies, cap_latencies * sizeof *latencies);
        if (!latencies)
            die("out of memory for latencies");
    }
    latencies[n_latencies++] = seconds;
}

static void data_received(struct conn *c, const uint8_t *data, uint64_t n) {
    uint64_t start = c->received;
    if (c->bad)
        return;
    if (start + n > c->written) {
        uint64_t extra = start + n - c->written;
        fail(c, data, c->written - start, start);
        result.errors++;
        sample("%llu bytes beyond the requests sent", (unsigned long long)extra);
        return;
    }
    if (!stream_equal(c, start, data, n)) {
        fail(c, data, n, start);
        return;
    }
    uint64_t before = start / pkt;
    c->received = start + n;
    uint64_t now_done = c->received / pkt;
    if (now_done == before)
        return;
    if (c->track_index >= 0 && now_done > (uint64_t)c->track_index) {
        if (measuring)
            push_latency(now() - c->track_time);
        c->track_index = -1;
    }
    if (!stopping)
        send_requests(c, now_done - before);
    else if (now_done == c->sent)
        mark_done(c);
}

static void on_readable(struct conn *c) {
    for (;;) {
        ssize_t n = read(c->fd, read_buf, READ_BUF);
        if (n > 0) {
            data_received(c, read_buf, (uint64_t)n);
            if (n < READ_BUF || c->fd < 0)
                return;
            continue; /* a full buffer: there may be more */
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        lost(c); /* EOF or a reset */
        return;
    }
}

/* Connecting -------------------------------------------------------------------------- */

static struct addrinfo *target;
static int next_connect, connecting, n_connected;

static void start_connect(struct conn *c) {
    int fd = socket(target->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
    c->want_out = 1;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
        die("epoll_ctl: %s", strerror(errno));
    if (connect(fd, target->ai_addr, target->ai_addrlen) != 0 && errno != EINPROGRESS)
        die("connect to %s:%d: %s", cfg.host, cfg.port, strerror(errno));
    connecting++;
}

static void connect_done(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err)
        die("connect to %s:%d: %s", cfg.host, cfg.port, strerror(err));
    c->connected = 1;
    connecting--;
    n_connected++;
    set_events(c, 0);
    send_requests(c, (uint64_t)cfg.depth);
}

/* Event loop -------------------------------------------------------------------------- */

enum until { UNTIL_DEADLINE, UNTIL_CONNECTED, UNTIL_DONE };

/* Serve events until `deadline`, or before it once every connection is connected / done. */
static void loop_until(double deadline, enum until until) {
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        while (next_connect < n_conns && connecting < CONNECTS_IN_PROGRESS)
            start_connect(&conns[next_connect++]);
        double t = now();
        if (t >= deadline || (until == UNTIL_DONE && n_done == n_conns) ||
            (until == UNTIL_CONNECTED && n_connected == n_conns))
            return;
        double wait = deadline - t;
        int timeout = wait > 1.0 ? 1000 : (int)ceil(wait * 1e3);
        int n = epoll_wait(epfd, events, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[events[i].data.u32];
            if (c->fd < 0)
                continue;
            uint32_t e = events[i].events;
            if (!c->connected) {
                if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    connect_done(c);
                continue;
            }
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
            if (c->fd >= 0 && (e & EPOLLOUT))
                flush(c);
        }
    }
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

static uint64_t total_completed(void) {
    uint64_t sum = 0;
    for (int i = 0; i < n_conns; i++)
        sum += conns[i].received / pkt;
    return sum;
}

/* One process: `count` connections, ring user_ids from first_index + 1 (loadgen's
   _run_connections). Fills `result`. */
static void run_connections(int first_index, int count, double start_at) {
    n_conns = count;
    rng_state = (uint64_t)first_index * 7919 + (uint64_t)getpid() * 0x100000001ULL + (uint64_t)(now() * 1e9);
    raise_open_files(count + 64);
    read_buf = malloc(READ_BUF);
    conns = calloc((size_t)count, sizeof *conns);
    if (!read_buf || !conns)
        die("out of memory");
    uint64_t ring_bytes;
    int ring_count;
    ring_plan(count, &ring_bytes, &ring_count);
    double connect_start = now();
    uint8_t **rings = malloc((size_t)ring_count * sizeof *rings);
    uint64_t k = 0;
    for (int i = 0; i < ring_count; i++)
        rings[i] = build_ring((uint32_t)(first_index + i + 1), ring_bytes, &k);
    for (int i = 0; i < count; i++) {
        conns[i].fd = -1;
        conns[i].ring = rings[i % ring_count];
        conns[i].ring_len = k * pkt;
        conns[i].track_index = -1;
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));

    loop_until(connect_start + CONNECT_TIMEOUT, UNTIL_CONNECTED);
    if (n_connected < count)
        die("only %d of %d connections established", n_connected, count);
    double connected = now();
    /* A server slow to accept must not eat the window: warm up after the last connect. */
    if (start_at < connected + cfg.warmup)
        start_at = connected + cfg.warmup;
    loop_until(start_at, UNTIL_DEADLINE);
    measuring = 1;
    uint64_t done_before = total_completed();
    double cpu_before = cpu_seconds();
    double t0 = now();
    loop_until(start_at + cfg.duration, UNTIL_DEADLINE);
    double t1 = now();
    double cpu_after = cpu_seconds();
    uint64_t done_after = total_completed();
    measuring = 0;
    stopping = 1;

    for (int i = 0; i < count; i++) /* connections already idle will not see another reply */
        if (conns[i].received / pkt == conns[i].sent)
            mark_done(&conns[i]);
    loop_until(now() + cfg.drain_timeout, UNTIL_DONE);
    uint64_t missing = 0;
    for (int i = 0; i < count; i++)
        if (!conns[i].bad)
            missing += conns[i].sent - conns[i].received / pkt;
    if (missing) {
        result.errors += missing;
        sample("%llu replies never arrived within %gs", (unsigned long long)missing, cfg.drain_timeout);
    }
    for (int i = 0; i < count; i++)
        close_conn(&conns[i]);
    close(epfd);
    result.completed = done_after - done_before;
    result.connect_s = connected - connect_start;
    result.elapsed = t1 - t0;
    result.cpu = cpu_after - cpu_before;
    result.n_latencies = n_latencies;
}

/* Several processes -------------------------------------------------------------------- */

static int write_all(int fd, const void *data, size_t size) {
    const char *p = data;
    while (size) {
        ssize_t n = write(fd, p, size);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        size -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, void *data, size_t size, off_t off) {
    char *p = data;
    while (size) {
        ssize_t n = pread(fd, p, size, off);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        off += n;
        size -= (size_t)n;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double percentile(const double *sorted, uint64_t n, double q) {
    if (!n)
        return NAN;
    uint64_t i = (uint64_t)(q * (double)n);
    return sorted[i < n - 1 ? i : n - 1];
}

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static void json_number(double v) {
    if (isnan(v))
        fputs("NaN", stdout); /* as Python's json.dumps writes it */
    else
        printf("%.17g", v);
}

/* loadgen._merge; prints the result; returns the error count. */
static uint64_t merge_and_print(struct part *parts, int n_parts, double *all_lat, uint64_t n_lat, double start_at) {
    qsort(all_lat, n_lat, sizeof *all_lat, cmp_double);
    double elapsed = 0, cpu = 0, connect_s = 0;
    uint64_t completed = 0, errors = 0, closed_early = 0;
    for (int i = 0; i < n_parts; i++) {
        if (parts[i].elapsed > elapsed) elapsed = parts[i].elapsed;
        if (parts[i].connect_s > connect_s) connect_s = parts[i].connect_s;
        completed += parts[i].completed;
        cpu += parts[i].cpu;
        errors += parts[i].errors;
        closed_early += parts[i].closed_early;
    }
    printf("{\"config\": {\"host\": ");
    json_string(cfg.host);
    printf(", \"port\": %d, \"connections\": %d, \"depth\": %d, \"body\": %d, \"duration\": ", cfg.port,
           cfg.connections, cfg.depth, cfg.body);
    json_number(cfg.duration);
    printf(", \"warmup\": ");
    json_number(cfg.warmup);
    printf(", \"cmd_id\": %d, \"processes\": %d, \"start_at\": ", cfg.cmd_id, cfg.processes);
    json_number(start_at);
    printf(", \"drain_timeout\": ");
    json_number(cfg.drain_timeout);
    printf("}, \"requests\": %llu, \"elapsed_s\": ", (unsigned long long)completed);
    json_number(elapsed);
    printf(", \"req_per_s\": ");
    json_number(elapsed > 0 ? (double)completed / elapsed : 0.0);
    printf(", \"bytes_per_s\": ");
    json_number(elapsed > 0 ? (double)completed * (double)pkt / elapsed : 0.0);
    printf(", \"latency_ms\": {\"p50\": ");
    json_number(percentile(all_lat, n_lat, 0.50) * 1e3);
    printf(", \"p99\": ");
    json_number(percentile(all_lat, n_lat, 0.99) * 1e3);
    printf(", \"p99.9\": ");
    json_number(percentile(all_lat, n_lat, 0.999) * 1e3);
    printf(", \"samples\": %llu}, \"errors\": %llu, \"error_samples\": [", (unsigned long long)n_lat,
           (unsigned long long)(errors + closed_early));
    int shown = 0;
    for (int i = 0; i < n_parts; i++)
        for (int j = 0; j < parts[i].n_samples && shown < MAX_ERROR_SAMPLES; j++, shown++) {
            if (shown)
                printf(", ");
            json_string(parts[i].samples[j]);
        }
    if (closed_early)
        printf("%s\"%llu connections closed by the server\"", shown ? ", " : "", (unsigned long long)closed_early);
    printf("], \"client_cpu_s\": ");
    json_number(cpu);
    printf(", \"connect_s\": ");
    json_number(connect_s);
    printf(", \"client_cpu_cores\": ");
    json_number(elapsed > 0 ? cpu / elapsed : 0.0);
    printf("}\n");
    fflush(stdout);
    return errors + closed_early;
}

static int run(void) {
    int processes = cfg.processes < cfg.connections ? cfg.processes : cfg.connections;
    double start_at = cfg.start_at >= 0 ? cfg.start_at : now() + 0.2 * processes + cfg.warmup;
    signal(SIGPIPE, SIG_IGN);
    if (processes == 1) {
        run_connections(0, cfg.connections, start_at);
        return merge_and_print(&result, 1, latencies, n_latencies, start_at) ? 1 : 0;
    }
    /* Fork: each child writes its part and latencies to its own unlinked temporary file. */
    struct part *parts = calloc((size_t)processes, sizeof *parts);
    int *files = calloc((size_t)processes, sizeof *files);
    pid_t *pids = calloc((size_t)processes, sizeof *pids);
    pid_t parent = getpid();
    int first = 0;
    fflush(stdout);
    for (int p = 0; p < processes; p++) {
        int share = cfg.connections / processes + (p < cfg.connections % processes ? 1 : 0);
        FILE *tmp = tmpfile();
        if (!tmp)
            die("tmpfile: %s", strerror(errno));
        files[p] = dup(fileno(tmp));
        fclose(tmp);
        pids[p] = fork();
        if (pids[p] < 0)
            die("fork: %s", strerror(errno));
        if (pids[p] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != parent)
                _exit(2);
            run_connections(first, share, start_at);
            if (write_all(files[p], &result, sizeof result) != 0 ||
                write_all(files[p], latencies, n_latencies * sizeof *latencies) != 0)
                die("writing the result: %s", strerror(errno));
            _exit(0);
        }
        first += share;
    }
    uint64_t n_lat = 0;
    for (int p = 0; p < processes; p++) {
        int status = 0;
        while (waitpid(pids[p], &status, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
            read_all(files[p], &parts[p], sizeof parts[p], 0) != 0)
            die("load generator process %d failed (status 0x%x)", p, status);
        n_lat += parts[p].n_latencies;
    }
    double *all = malloc((n_lat ? n_lat : 1) * sizeof *all);
    uint64_t at = 0;
    for (int p = 0; p < processes; p++) {
        if (read_all(files[p], all + at, parts[p].n_latencies * sizeof *all, sizeof parts[p]) != 0)
            die("reading process %d's latencies", p);
        at += parts[p].n_latencies;
        close(files[p]);
    }
    return merge_and_print(parts, processes, all, n_lat, start_at) ? 1 : 0;
}

/* Command line ------------------------------------------------------------------------- */

static void usage(void) {
    fputs("usage: cload [--target HOST:PORT] [-c CONNECTIONS] [-d DEPTH] [-b BODY] [-t SECONDS]\n"
          "             [--warmup SECONDS] [--cmd CMD_ID] [-p PROCESSES] [--start-at MONOTONIC]\n"
          "             [--drain-timeout SECONDS]\n"
          "Prints one JSON object (perf/loadgen.py's result); exit 1 if any error was counted.\n",
          stderr);
    exit(2);
}

static double parse_double(const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end)
        usage();
    return v;
}

static int parse_int(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < 0 || v > 1000000000)
        usage();
    return (int)v;
}

int main(int argc, char **argv) {
    cfg = (struct config){"127.0.0.1", 7000, 50, 16, 64, 5.0, 1.0, 1, 1, -1.0, 5.0};
    static const struct option options[] = {
        {"target", required_argument, 0, 'T'},      {"connections", required_argument, 0, 'c'},
        {"depth", required_argument, 0, 'd'},       {"body", required_argument, 0, 'b'},
        {"duration", required_argument, 0, 't'},    {"warmup", required_argument, 0, 'w'},
        {"cmd", required_argument, 0, 'm'},         {"processes", required_argument, 0, 'p'},
        {"start-at", required_argument, 0, 's'},    {"drain-timeout", required_argument, 0, 'D'},
        {"help", no_argument, 0, 'h'},              {0, 0, 0, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "c:d:b:t:p:h", options, NULL)) != -1) {
        switch (opt) {
        case 'T': {
            const char *colon = strrchr(optarg, ':');
            if (!colon)
                usage();
            size_t len = (size_t)(colon - optarg);
            if (len && optarg[0] == '[' && optarg[len - 1] == ']') { /* [::1]:7000 */
                optarg++;
                len -= 2;
            }
            if (len >= sizeof cfg.host)
                usage();
            if (len) {
                memcpy(cfg.host, optarg, len);
                cfg.host[len] = 0;
            }
            cfg.port = parse_int(colon + 1);
            break;
        }
        case 'c': cfg.connections = parse_int(optarg); break;
        case 'd': cfg.depth = parse_int(optarg); break;
        case 'b': cfg.body = parse_int(optarg); break;
        case 't': cfg.duration = parse_double(optarg); break;
        case 'w': cfg.warmup = parse_double(optarg); break;
        case 'm': cfg.cmd_id = parse_int(optarg); break;
        case 'p': cfg.processes = parse_int(optarg); break;
        case 's': cfg.start_at = parse_double(optarg); break;
        case 'D': cfg.drain_timeout = parse_double(optarg); break;
        default: usage();
        }
    }
    if (optind != argc || cfg.connections < 1 || cfg.depth < 1 || cfg.processes < 1 || cfg.cmd_id > 65535)
        usage();
    pkt = HEADER_SIZE + (uint64_t)cfg.body;
    char port[16];
    snprintf(port, sizeof port, "%d", cfg.port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    int rc = getaddrinfo(cfg.host, port, &hints, &target);
    if (rc != 0)
        die("%s: %s", cfg.host, gai_strerror(rc));
    return run();
}
