/* A narrow C face of ISA-L's streaming inflate (Debian libisal-dev) for
 * src/isal.rs: the Rust side never sees struct inflate_state, whose layout
 * belongs to the installed header, so no layout is duplicated in Rust. */
#include <stdint.h>
#include <stdlib.h>
#include <isa-l/igzip_lib.h>

/* A state that inflates one gzip member (header and trailer checked), or
 * NULL when out of memory. */
struct inflate_state *obd_isal_new(void)
{
	struct inflate_state *s = malloc(sizeof *s);
	if (s) {
		isal_inflate_init(s);
		s->crc_flag = ISAL_GZIP;
	}
	return s;
}

/* Ready for the next gzip member. */
void obd_isal_reset(struct inflate_state *s)
{
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP;
}

void obd_isal_free(struct inflate_state *s)
{
	free(s);
}

/* One step: inflates from in[0..in_len) into out[0..out_len). Returns
 * isal_inflate's code (< 0: corrupt data); *consumed and *produced say how
 * many bytes were taken and written, *finished is 1 once the member's
 * trailer is checked (unused input bytes are given back, see
 * isal_inflate). */
int obd_isal_inflate(struct inflate_state *s, const uint8_t *in, uint32_t in_len,
		     uint8_t *out, uint32_t out_len, uint32_t *consumed,
		     uint32_t *produced, int *finished)
{
	s->next_in = (uint8_t *)in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	int r = isal_inflate(s);
	*consumed = in_len - s->avail_in;
	*produced = out_len - s->avail_out;
	*finished = s->block_state == ISAL_BLOCK_FINISH;
	return r;
}
