/* kp-loadgen: short TCP connections (connect, send a small request, read the reply to EOF, close)
 * with N concurrent connections for D seconds or M connections, one epoll loop, JSON on stdout.
 *
 *   kp-loadgen -a 10.96.0.10|fd00:10:96::a -p 80 [-c 32] [-d 5 | -n 10000] [-t 2000] [-r "GET\n"] [-w 0.5]
 *
 * Latency = connect() call to EOF of the reply, in microseconds. Errors are counted by kind:
 * connect (refused/unreachable), io (reset or a failed send/recv), timeout (no reply within -t ms),
 * empty (EOF without a byte). -w SECONDS warms up (connections made but not recorded).
 * With -i, the replies (the backends' identities) are counted and reported.
 *
 * UDP flood mode (-U): datagrams of -s bytes from -f sockets (one source port each: -F first port, else
 * ephemeral ports), each connect()ed to the destination, sent round-robin in sendmmsg batches of -b, for
 * -d seconds, as fast as possible or at -R datagrams/s in total. Nothing is read back. JSON on stdout:
 * sent (datagrams the kernel took), the send errors by kind, the rate and the process's CPU time.
 *
 *   kp-loadgen -U -a ADDR -p PORT -d SECONDS [-f 256] [-s 18] [-b 16] [-R 0] [-F SPORT]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_IDLE, ST_CONNECTING, ST_READING };
#define MAX_IDS 64
#define REPLY_MAX 256

struct slot {
	int fd, state;
	uint64_t start_ns;
	size_t got;
	char reply[REPLY_MAX];
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The destination, IPv4 or IPv6 (-a takes either form; a bracketed IPv6 address too). */
static struct sockaddr_storage dst;
static socklen_t dst_len;
static const char *request = "GET\n";
static size_t request_len;
static int epfd;
static uint32_t *lat;
static size_t nlat, caplat;
static uint64_t err_connect, err_io, err_timeout, err_empty, started, recording_from_ns;
static int count_ids;
static char ids[MAX_IDS][REPLY_MAX];
static uint64_t id_count[MAX_IDS];
static int nids;

static void record_id(const char *r, size_t n)
{
	char buf[REPLY_MAX];
	while (n && (r[n - 1] == '\n' || r[n - 1] == '\r'))
		n--;
	memcpy(buf, r, n);
	buf[n] = 0;
	for (int i = 0; i < nids; i++)
		if (!strcmp(ids[i], buf)) {
			id_count[i]++;
			return;
		}
	if (nids < MAX_IDS) {
		strcpy(ids[nids], buf);
		id_count[nids++] = 1;
	}
}

static void finish(struct slot *s, int ok_kind)
{
	/* ok_kind: 0 success, 1 connect, 2 io, 3 timeout, 4 empty */
	uint64_t end = now_ns();
	if (s->fd >= 0)
		close(s->fd); /* close() drops the epoll registration too */
	s->fd = -1;
	s->state = ST_IDLE;
	if (s->start_ns < recording_from_ns)
		return;
	switch (ok_kind) {
	case 0:
		if (nlat == caplat) {
			caplat = caplat ? caplat * 2 : 1 << 16;
			lat = realloc(lat, caplat * sizeof(*lat));
			if (!lat) {
				perror("realloc");
				exit(2);
			}
		}
		lat[nlat++] = (uint32_t)((end - s->start_ns) / 1000);
		if (count_ids)
			record_id(s->reply, s->got);
		break;
	case 1: err_connect++; break;
	case 2: err_io++; break;
	case 3: err_timeout++; break;
	default: err_empty++; break;
	}
}

static void start(struct slot *s)
{
	s->got = 0;
	s->start_ns = now_ns();
	if (s->start_ns >= recording_from_ns)
		started++;
	s->fd = socket(dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->fd < 0) {
		finish(s, 1);
		return;
	}
	int one = 1;
	setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(s->fd, (struct sockaddr *)&dst, dst_len) < 0 && errno != EINPROGRESS) {
		finish(s, 1);
		return;
	}
	s->state = ST_CONNECTING;
	struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = s };
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0)
		finish(s, 2);
}

static void on_event(struct slot *s, uint32_t events)
{
	if (s->state == ST_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err || (events & (EPOLLERR | EPOLLHUP))) {
			finish(s, 1);
			return;
		}
		if (send(s->fd, request, request_len, MSG_NOSIGNAL) != (ssize_t)request_len) {
			finish(s, 2);
			return;
		}
		s->state = ST_READING;
		struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = s };
		epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
		return;
	}
	for (;;) {
		char buf[4096];
		ssize_t n = recv(s->fd, buf, sizeof(buf), 0);
		if (n > 0) {
			size_t room = REPLY_MAX - 1 - s->got;
			size_t c = (size_t)n < room ? (size_t)n : room;
			memcpy(s->reply + s->got, buf, c);
			s->got += c;
			continue;
		}
		if (n == 0) {
			finish(s, s->got ? 0 : 4);
			return;
		}
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return;
		finish(s, 2);
		return;
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static void usage(void)
{
	fprintf(stderr, "usage: kp-loadgen -a ADDR -p PORT [-c CONC] [-d SECONDS | -n CONNS] [-t TIMEOUT_MS]"
			" [-r REQUEST] [-w WARMUP_S] [-i]\n"
			"       kp-loadgen -U -a ADDR -p PORT -d SECONDS [-f FLOWS] [-s SIZE] [-b BATCH] [-R PPS]"
			" [-F SPORT]\n");
	exit(2);
}

#define FLOOD_MAX_BATCH 256
#define FLOOD_MAX_SIZE 65507

static double cpu_s(const struct timeval *tv)
{
	return (double)tv->tv_sec + (double)tv->tv_usec / 1e6;
}

/* -U: FLOWS connected UDP sockets, round-robin sendmmsg batches until DURATION is over. */
static int udp_flood(double duration, int flows, int size, int batch, double pps, int sport)
{
	int *fds = calloc((size_t)flows, sizeof(*fds));
	char *payload = calloc(1, (size_t)size + 1);
	struct mmsghdr msgs[FLOOD_MAX_BATCH];
	struct iovec iov = { .iov_base = payload, .iov_len = (size_t)size };
	uint64_t sent = 0, err_again = 0, err_refused = 0, err_other = 0;
	if (!fds || !payload) {
		perror("kp-loadgen: setup");
		return 2;
	}
	memset(payload, 'u', (size_t)size);
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < batch; i++) {
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	for (int i = 0; i < flows; i++) {
		fds[i] = socket(dst.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fds[i] < 0) {
			perror("kp-loadgen: socket");
			return 2;
		}
		int one = 1, sndbuf = 1 << 20;
		setsockopt(fds[i], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
		if (sport) {
			struct sockaddr_storage src = { .ss_family = dst.ss_family };
			if (dst.ss_family == AF_INET6)
				((struct sockaddr_in6 *)&src)->sin6_port = htons((uint16_t)(sport + i));
			else
				((struct sockaddr_in *)&src)->sin_port = htons((uint16_t)(sport + i));
			if (bind(fds[i], (struct sockaddr *)&src, dst_len) < 0) {
				fprintf(stderr, "kp-loadgen: bind source port %d: %s\n", sport + i, strerror(errno));
				return 2;
			}
		}
		if (connect(fds[i], (struct sockaddr *)&dst, dst_len) < 0) {
			perror("kp-loadgen: connect");
			return 2;
		}
	}
	struct rusage ru0, ru1;
	getrusage(RUSAGE_SELF, &ru0);
	uint64_t t0 = now_ns(), stop = t0 + (uint64_t)(duration * 1e9), t = t0;
	for (int i = 0; t < stop; i = (i + 1) % flows) {
		int n = batch;
		if (pps > 0) {
			/* open loop at PPS, a batch at a time: sleep until the batch's last datagram is due */
			uint64_t due = t0 + (uint64_t)((double)(sent + (uint64_t)n) * 1e9 / pps);
			if (due > stop)
				break;
			if (due > t) {
				uint64_t wait = due - t < 999999999ull ? due - t : 999999999ull;
				struct timespec ts = { 0, (long)wait };
				nanosleep(&ts, NULL);
			}
		}
		int r = sendmmsg(fds[i], msgs, (unsigned int)n, MSG_DONTWAIT);
		if (r > 0) {
			sent += (uint64_t)r;
		} else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
			err_again++;
		} else if (errno == ECONNREFUSED) {
			err_refused++; /* an ICMP port unreachable came back to this socket */
		} else {
			err_other++;
		}
		t = now_ns();
	}
	t = now_ns();
	getrusage(RUSAGE_SELF, &ru1);
	double secs = (double)(t - t0) / 1e9;
	printf("{\"mode\": \"udp\", \"sent\": %llu, \"rate\": %.1f, \"duration_s\": %.3f, \"flows\": %d, "
	       "\"size\": %d, \"batch\": %d, \"pps_limit\": %.0f, \"send_errors\": {\"again\": %llu, "
	       "\"refused\": %llu, \"other\": %llu}, \"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f}\n",
	       (unsigned long long)sent, secs > 0 ? (double)sent / secs : 0.0, secs, flows, size, batch, pps,
	       (unsigned long long)err_again, (unsigned long long)err_refused, (unsigned long long)err_other,
	       cpu_s(&ru1.ru_utime) - cpu_s(&ru0.ru_utime), cpu_s(&ru1.ru_stime) - cpu_s(&ru0.ru_stime));
	return 0;
}

int main(int argc, char **argv)
{
	const char *addr = NULL;
	int port = 0, conc = 32, timeout_ms = 2000, opt;
	double duration = 0, warmup = 0;
	uint64_t total = 0;
	int udp = 0, flows = 256, size = 18, batch = 16, sport = 0;
	double pps = 0;
	while ((opt = getopt(argc, argv, "a:p:c:d:n:t:r:w:iUf:s:b:R:F:")) != -1) {
		switch (opt) {
		case 'U': udp = 1; break;
		case 'f': flows = atoi(optarg); break;
		case 's': size = atoi(optarg); break;
		case 'b': batch = atoi(optarg); break;
		case 'R': pps = atof(optarg); break;
		case 'F': sport = atoi(optarg); break;
		case 'a': addr = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'c': conc = atoi(optarg); break;
		case 'd': duration = atof(optarg); break;
		case 'n': total = strtoull(optarg, NULL, 10); break;
		case 't': timeout_ms = atoi(optarg); break;
		case 'r': request = optarg; break;
		case 'w': warmup = atof(optarg); break;
		case 'i': count_ids = 1; break;
		default: usage();
		}
	}
	if (!addr || port <= 0 || port > 65535 || conc <= 0 || (duration <= 0 && total == 0))
		usage();
	if (udp && (duration <= 0 || flows <= 0 || size < 0 || size > FLOOD_MAX_SIZE || batch <= 0 ||
		    batch > FLOOD_MAX_BATCH || pps < 0 || sport < 0 || (sport && sport + flows > 65536)))
		usage();
	request_len = strlen(request);
	char host[INET6_ADDRSTRLEN + 2];
	size_t alen = strlen(addr);
	if (alen >= sizeof(host)) {
		fprintf(stderr, "kp-loadgen: %s is not an IPv4 or IPv6 address\n", addr);
		return 2;
	}
	if (addr[0] == '[' && alen > 2 && addr[alen - 1] == ']') {
		memcpy(host, addr + 1, alen - 2);
		host[alen - 2] = 0;
	} else {
		memcpy(host, addr, alen + 1);
	}
	struct sockaddr_in *d4 = (struct sockaddr_in *)&dst;
	struct sockaddr_in6 *d6 = (struct sockaddr_in6 *)&dst;
	if (inet_pton(AF_INET, host, &d4->sin_addr) == 1) {
		d4->sin_family = AF_INET;
		d4->sin_port = htons((uint16_t)port);
		dst_len = sizeof(*d4);
	} else if (inet_pton(AF_INET6, host, &d6->sin6_addr) == 1) {
		d6->sin6_family = AF_INET6;
		d6->sin6_port = htons((uint16_t)port);
		dst_len = sizeof(*d6);
	} else {
		fprintf(stderr, "kp-loadgen: %s is not an IPv4 or IPv6 address\n", addr);
		return 2;
	}
	if (udp)
		return udp_flood(duration, flows, size, batch, pps, sport);
	epfd = epoll_create1(EPOLL_CLOEXEC);
	struct slot *slots = calloc((size_t)conc, sizeof(*slots));
	struct epoll_event *evs = calloc((size_t)conc, sizeof(*evs));
	if (!slots || !evs || epfd < 0) {
		perror("kp-loadgen: setup");
		return 2;
	}
	uint64_t t0 = now_ns();
	recording_from_ns = t0 + (uint64_t)(warmup * 1e9);
	uint64_t stop_ns = duration > 0 ? recording_from_ns + (uint64_t)(duration * 1e9) : UINT64_MAX;
	uint64_t timeout_ns = (uint64_t)timeout_ms * 1000000ull;
	for (int i = 0; i < conc; i++) {
		slots[i].fd = -1;
		if (!total || warmup > 0 || started < total)
			start(&slots[i]);
	}
	for (;;) {
		uint64_t t = now_ns();
		int active = 0;
		for (int i = 0; i < conc; i++) {
			struct slot *s = &slots[i];
			if (s->state != ST_IDLE && t - s->start_ns > timeout_ns)
				finish(s, 3);
			/* -n counts only connections started after the warm-up. */
			int more = t < stop_ns && (!total || t < recording_from_ns || started < total);
			if (s->state == ST_IDLE && more)
				start(s);
			if (s->state != ST_IDLE)
				active++;
		}
		if (!active)
			break;
		int n = epoll_wait(epfd, evs, conc, 10);
		for (int i = 0; i < n; i++)
			on_event(evs[i].data.ptr, evs[i].events);
	}
	uint64_t t_end = now_ns();
	double secs = (double)(t_end - (recording_from_ns > t0 ? recording_from_ns : t0)) / 1e9;
	qsort(lat, nlat, sizeof(*lat), cmp_u32);
	uint32_t p50 = nlat ? lat[nlat / 2] : 0;
	uint32_t p99 = nlat ? lat[(size_t)((double)(nlat - 1) * 0.99)] : 0;
	uint32_t mx = nlat ? lat[nlat - 1] : 0;
	uint64_t errors = err_connect + err_io + err_timeout + err_empty;
	printf("{\"connections\": %zu, \"errors\": %llu, \"rate\": %.1f, \"p50_us\": %u, \"p99_us\": %u, "
	       "\"max_us\": %u, \"duration_s\": %.3f, \"concurrency\": %d, "
	       "\"error_kinds\": {\"connect\": %llu, \"io\": %llu, \"timeout\": %llu, \"empty\": %llu}",
	       nlat, (unsigned long long)errors, secs > 0 ? (double)nlat / secs : 0.0, p50, p99, mx, secs, conc,
	       (unsigned long long)err_connect, (unsigned long long)err_io, (unsigned long long)err_timeout,
	       (unsigned long long)err_empty);
	if (count_ids) {
		printf(", \"replies\": {");
		for (int i = 0; i < nids; i++) {
			printf("%s\"", i ? ", " : "");
			for (const char *c = ids[i]; *c; c++)
				if (*c == '"' || *c == '\\')
					printf("\\%c", *c);
				else if ((unsigned char)*c >= 0x20)
					putchar(*c);
			printf("\": %llu", (unsigned long long)id_count[i]);
		}
		printf("}");
	}
	printf("}\n");
	return 0;
}
