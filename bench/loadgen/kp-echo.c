/* kp-echo: the backends' server for the benchmarks. Accepts, reads one request, writes its identity
 * and a newline, closes (the server closes first, so TIME_WAIT stays on the server side and the
 * client's ports are free again at once). One epoll loop per process; -P N forks N processes sharing
 * the listening ports with SO_REUSEPORT so the server is never the bottleneck.
 *
 *   kp-echo -l 0.0.0.0:8080 [-l [::]:8080] [-l ADDR:PORT ...] [-i IDENTITY] [-P PROCS]
 *
 * Without -i the identity is the local address:port the connection arrived at, so one process
 * serving several backend addresses still tells them apart.
 *
 * UDP sink mode (-u): one UDP socket bound to ADDR:PORT (a 32 MiB receive buffer), datagrams read with
 * recvmmsg and counted, nothing answered. On SIGUSR1 it prints the totals so far as one JSON line
 * ({"datagrams": N, "bytes": B}); on SIGTERM or SIGINT it prints them and exits.
 *
 *   kp-echo -u ADDR:PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_LISTEN 16

static int listen_fds[MAX_LISTEN], nlisten;
static const char *identity;

/* A listening TCP socket (SOCK_STREAM) or a bound UDP socket (SOCK_DGRAM) on ADDR:PORT / [ADDR6]:PORT. */
static int open_socket(const char *spec, int type)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon = strrchr(spec, ':');
	if (!colon || (size_t)(colon - spec) >= sizeof(host)) {
		fprintf(stderr, "kp-echo: -l %s: expected ADDR:PORT or [ADDR6]:PORT\n", spec);
		exit(2);
	}
	size_t hlen = (size_t)(colon - spec);
	if (hlen >= 2 && spec[0] == '[' && spec[hlen - 1] == ']') {
		memcpy(host, spec + 1, hlen - 2);
		host[hlen - 2] = 0;
	} else {
		memcpy(host, spec, hlen);
		host[hlen] = 0;
	}
	uint16_t port = htons((uint16_t)atoi(colon + 1));
	struct sockaddr_storage ss = { 0 };
	struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
	socklen_t sl;
	if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = port;
		sl = sizeof(*s4);
	} else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = port;
		sl = sizeof(*s6);
	} else {
		fprintf(stderr, "kp-echo: -l %s: %s is not an IPv4 or IPv6 address\n", spec, host);
		exit(2);
	}
	int fd = socket(ss.ss_family, type | (type == SOCK_STREAM ? SOCK_NONBLOCK : 0) | SOCK_CLOEXEC, 0);
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (ss.ss_family == AF_INET6) {
		/* [::]:PORT serves IPv6 only: a 0.0.0.0 listener on the same port may sit beside it. */
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		setsockopt(fd, IPPROTO_IPV6, IPV6_FREEBIND, &one, sizeof(one));
	} else {
		setsockopt(fd, IPPROTO_IP, IP_FREEBIND, &one, sizeof(one));
	}
	if (type == SOCK_DGRAM) {
		int rcvbuf = 32 << 20;
		/* root ignores net.core.rmem_max with SO_RCVBUFFORCE; others get what SO_RCVBUF allows */
		if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
			setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	}
	if (bind(fd, (struct sockaddr *)&ss, sl) < 0 || (type == SOCK_STREAM && listen(fd, 4096) < 0)) {
		fprintf(stderr, "kp-echo: cannot listen on %s: %s\n", spec, strerror(errno));
		exit(1);
	}
	return fd;
}

static int open_listener(const char *spec)
{
	return open_socket(spec, SOCK_STREAM);
}

static void reply(int fd)
{
	char buf[4096], id[128];
	ssize_t n = recv(fd, buf, sizeof(buf), 0);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return; /* request not here yet; epoll calls again */
	if (n > 0) {
		int len;
		if (identity) {
			len = snprintf(id, sizeof(id), "%s\n", identity);
		} else {
			/* addr:port for IPv4, [addr]:port for IPv6 (as kube-proxy prints endpoints) */
			struct sockaddr_storage ss;
			socklen_t sl = sizeof(ss);
			char ip[INET6_ADDRSTRLEN] = "?";
			getsockname(fd, (struct sockaddr *)&ss, &sl);
			if (ss.ss_family == AF_INET6) {
				struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
				inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
				len = snprintf(id, sizeof(id), "[%s]:%u\n", ip, ntohs(s6->sin6_port));
			} else {
				struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
				inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
				len = snprintf(id, sizeof(id), "%s:%u\n", ip, ntohs(s4->sin_port));
			}
		}
		send(fd, id, (size_t)len, MSG_NOSIGNAL);
	}
	close(fd);
}

static void serve(void)
{
	int ep = epoll_create1(EPOLL_CLOEXEC);
	for (int i = 0; i < nlisten; i++) {
		struct epoll_event ev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = -1 - i };
		epoll_ctl(ep, EPOLL_CTL_ADD, listen_fds[i], &ev);
	}
	struct epoll_event evs[256];
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		if (n < 0 && errno == EINTR)
			continue;
		for (int i = 0; i < n; i++) {
			int tag = evs[i].data.fd;
			if (tag >= 0) {
				reply(tag);
				continue;
			}
			for (;;) {
				int c = accept4(listen_fds[-1 - tag], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (c < 0)
					break;
				/* Usually the request is already queued: answer without an epoll round trip. */
				char peek;
				if (recv(c, &peek, 1, MSG_PEEK) == 1) {
					reply(c);
					continue;
				}
				struct epoll_event ev = { .events = EPOLLIN | EPOLLONESHOT, .data.fd = c };
				epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
			}
		}
	}
}

static volatile sig_atomic_t sink_report, sink_stop;

static void on_sink_signal(int sig)
{
	if (sig == SIGUSR1)
		sink_report = 1;
	else
		sink_stop = 1;
}

/* -u: count datagrams until SIGTERM; totals on stdout at SIGUSR1 and at the end. */
static int udp_sink(const char *spec)
{
	enum { VLEN = 64, DGRAM_MAX = 2048 };
	static char bufs[VLEN][DGRAM_MAX];
	struct iovec iovs[VLEN];
	struct mmsghdr msgs[VLEN];
	unsigned long long datagrams = 0, bytes = 0;
	int fd = open_socket(spec, SOCK_DGRAM);
	struct sigaction sa = { .sa_handler = on_sink_signal }; /* no SA_RESTART: recvmmsg returns EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < VLEN; i++) {
		iovs[i].iov_base = bufs[i];
		iovs[i].iov_len = DGRAM_MAX;
		msgs[i].msg_hdr.msg_iov = &iovs[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	for (;;) {
		int n = recvmmsg(fd, msgs, VLEN, MSG_WAITFORONE, NULL);
		for (int i = 0; i < n; i++)
			bytes += msgs[i].msg_len;
		if (n > 0)
			datagrams += (unsigned long long)n;
		else if (errno != EINTR && errno != EAGAIN) {
			perror("kp-echo: recvmmsg");
			return 1;
		}
		if (sink_report || sink_stop) {
			sink_report = 0;
			printf("{\"datagrams\": %llu, \"bytes\": %llu}\n", datagrams, bytes);
			fflush(stdout);
			if (sink_stop)
				return 0;
		}
	}
}

int main(int argc, char **argv)
{
	int procs = 1, opt;
	const char *sink = NULL;
	while ((opt = getopt(argc, argv, "l:i:P:u:")) != -1) {
		switch (opt) {
		case 'u': sink = optarg; break;
		case 'l':
			if (nlisten == MAX_LISTEN) {
				fprintf(stderr, "kp-echo: at most %d -l\n", MAX_LISTEN);
				return 2;
			}
			listen_fds[nlisten++] = open_listener(optarg);
			break;
		case 'i': identity = optarg; break;
		case 'P': procs = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: kp-echo -l ADDR:PORT [-l ...] [-i IDENTITY] [-P PROCS]\n"
					"       kp-echo -u ADDR:PORT\n");
			return 2;
		}
	}
	if (sink) {
		if (nlisten) {
			fprintf(stderr, "kp-echo: -u is a mode of its own (no -l with it)\n");
			return 2;
		}
		return udp_sink(sink);
	}
	if (!nlisten) {
		fprintf(stderr, "usage: kp-echo -l ADDR:PORT [-l ...] [-i IDENTITY] [-P PROCS]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	/* Children die with the parent (the harness kills the parent by pid). */
	for (int i = 1; i < procs; i++) {
		pid_t pid = fork();
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			serve();
		}
	}
	serve();
	return 0;
}
