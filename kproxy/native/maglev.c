// SPDX-License-Identifier: Apache-2.0
/*
 * The Maglev table population (Eisenbud et al., NSDI 2016, Pseudocode 1), loaded by
 * kproxy/sync/maglev.py through ctypes (`make native` builds libkpmaglev.so next to this file).
 *
 * Backends i = 0..n-1 take turns; each takes the next slot of its preference list
 * (offsets[i] + j * skips[i]) % m that is still empty, until all m slots are full. The Python
 * caller checks its arguments (m prime, n < m); this function checks only what keeps it from
 * reading or writing out of bounds, or looping forever.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#define KP_MAGLEV_EMPTY 0xFFFFu /* never an index: n <= 65535, so indices stop at 65534 */

int kp_maglev_fill(uint32_t m, uint32_t n, const uint32_t *offsets, const uint32_t *skips, uint16_t *out)
{
	uint32_t *pos, *tries;
	uint32_t i, p, s, filled = 0;

	/* m < 2^31: pos + skip never wraps */
	if (m == 0 || m >= 0x80000000u || n == 0 || n > 65535 || n > m || !offsets || !skips || !out)
		return -EINVAL;
	for (i = 0; i < n; i++)
		if (offsets[i] >= m || skips[i] == 0 || skips[i] >= m)
			return -EINVAL;

	pos = malloc((size_t)n * sizeof(*pos));
	tries = calloc(n, sizeof(*tries));
	if (!pos || !tries) {
		free(pos);
		free(tries);
		return -ENOMEM;
	}
	for (i = 0; i < n; i++)
		pos[i] = offsets[i];
	for (p = 0; p < m; p++)
		out[p] = KP_MAGLEV_EMPTY;

	for (;;) {
		for (i = 0; i < n; i++) {
			p = pos[i];
			s = skips[i];
			while (out[p] != KP_MAGLEV_EMPTY) {
				/* a skip sharing a factor with m (m not prime) visits only part of the table */
				if (++tries[i] >= m) {
					free(pos);
					free(tries);
					return -EINVAL;
				}
				p += s;
				if (p >= m)
					p -= m;
			}
			out[p] = (uint16_t)i;
			tries[i]++;
			p += s;
			if (p >= m)
				p -= m;
			pos[i] = p;
			if (++filled == m) {
				free(pos);
				free(tries);
				return 0;
			}
		}
	}
}
