/*
 * A test oracle: builds one TurboOCI EROFS layer with erofs-utils'
 * library (eec6f7a2) the way overlaybd's turboOCI-apply --fstype erofs
 * drives it (tar "reserved space" mode, overlayfs strip, aufs whiteouts,
 * 16 KiB root xattr room on the bottom layer, incremental on a lower
 * image), with a target that records what overlaybd's 512-byte sector
 * cache would write.
 *
 * usage: driver TAR LOWER_IMG|- OUT_PREFIX
 *   LOWER_IMG: raw image holding the lower layers' metadata ("-" for the
 *   bottom layer). Writes OUT_PREFIX.sectors ([u64 sector][512 bytes]...,
 *   sorted) and OUT_PREFIX.maps ("device_offset length tar_offset" lines).
 *
 * Build: see build.sh. Not part of the test suite's requirements; used by
 * fs/tests/erofs_oracle.rs when EROFS_ORACLE points at the binary.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "erofs/blobchunk.h"
#include "erofs/block_list.h"
#include "erofs/cache.h"
#include "erofs/config.h"
#include "erofs/inode.h"
#include "erofs/io.h"
#include "erofs/rebuild.h"
#include "erofs/tar.h"
#include "erofs/xattr.h"

#define SEC 512

struct sector { uint64_t no; unsigned char d[SEC]; };
static struct sector *secs;
static size_t nsecs, capsecs;
static FILE *lower;
static FILE *tarf;

/* Sectors are kept sorted by number: binary search. */
static size_t lower_bound(uint64_t no)
{
	size_t lo = 0, hi = nsecs;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (secs[mid].no < no)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static struct sector *find(uint64_t no)
{
	size_t i = lower_bound(no);
	return i < nsecs && secs[i].no == no ? &secs[i] : NULL;
}

static void base_read(uint64_t no, unsigned char *d)
{
	memset(d, 0, SEC);
	if (lower && !fseeko(lower, (off_t)(no * SEC), SEEK_SET))
		(void)!fread(d, 1, SEC, lower);
}

static ssize_t t_pread(struct erofs_vfile *vf, void *buf, u64 off, size_t len)
{
	unsigned char *b = buf;
	for (size_t done = 0; done < len;) {
		uint64_t pos = off + done, no = pos / SEC;
		size_t o = pos % SEC, n = SEC - o < len - done ? SEC - o : len - done;
		unsigned char tmp[SEC];
		struct sector *s = find(no);
		if (!s)
			base_read(no, tmp);
		memcpy(b + done, (s ? s->d : tmp) + o, n);
		done += n;
	}
	return len;
}

static ssize_t t_pwrite(struct erofs_vfile *vf, const void *buf, u64 off, size_t len)
{
	const unsigned char *b = buf;
	for (size_t done = 0; done < len;) {
		uint64_t pos = off + done, no = pos / SEC;
		size_t o = pos % SEC, n = SEC - o < len - done ? SEC - o : len - done;
		struct sector *s = find(no);
		if (!s) {
			size_t i = lower_bound(no);
			if (nsecs == capsecs) {
				capsecs = capsecs ? capsecs * 2 : 1024;
				secs = realloc(secs, capsecs * sizeof(*secs));
			}
			memmove(&secs[i + 1], &secs[i], (nsecs - i) * sizeof(*secs));
			nsecs++;
			s = &secs[i];
			s->no = no;
			base_read(no, s->d);
		}
		memcpy(s->d + o, b + done, n);
		done += n;
	}
	return len;
}

/* overlaybd's erofs_target_fallocate, quirks included. */
static int t_fallocate(struct erofs_vfile *vf, u64 off, size_t len, bool pad)
{
	static const char zero[4096];
	ssize_t ret;
	while (len > 4096) {
		ret = t_pwrite(vf, zero, off, 4096);
		if (ret)
			return ret;
		len -= 4096;
		off += 4096;
	}
	ret = t_pwrite(vf, zero, off, len);
	return ret == (ssize_t)len ? 0 : -1;
}

static int t_fsync(struct erofs_vfile *vf) { return 0; }
static int t_ftruncate(struct erofs_vfile *vf, u64 l) { return 0; }

static ssize_t s_read(struct erofs_vfile *vf, void *buf, size_t len)
{
	return fread(buf, 1, len, tarf);
}

static off_t s_lseek(struct erofs_vfile *vf, u64 off, int whence)
{
	if (fseeko(tarf, (off_t)off, whence))
		return -errno;
	return ftello(tarf);
}

int main(int argc, char **argv)
{
	struct erofs_vfops tops = { .pread = t_pread, .pwrite = t_pwrite,
		.fsync = t_fsync, .fallocate = t_fallocate, .ftruncate = t_ftruncate };
	struct erofs_vfops sops = { .read = s_read, .lseek = s_lseek };
	struct erofs_tarfile tar = {};
	struct erofs_buffer_head *sb_bh = NULL;
	struct erofs_inode *root;
	erofs_blk_t nblocks;
	bool first;
	FILE *mp;
	char path[4096], *line = NULL;
	size_t llen = 0;
	int err;

	if (argc != 4)
		return 2;
	tarf = fopen(argv[1], "rb");
	first = !strcmp(argv[2], "-");
	lower = first ? NULL : fopen(argv[2], "rb");
	if (!tarf || (!first && !lower))
		return 2;

	g_sbi.blkszbits = 12;
	g_sbi.bdev.ops = &tops;
	g_sbi.devsz = INT64_MAX;

	erofs_init_configure();
	cfg.c_ovlfs_strip = true;
	cfg.c_root_xattr_isize = first ? 16 * 1024 : 0;

	init_list_head(&tar.global.xattrs);
	tar.aufs = true;
	tar.dev = 1;
	tar.ios.bufsize = 16384;
	tar.ios.buffer = malloc(tar.ios.bufsize);
	tar.ios.dumpfd = -1;
	tar.ios.vf.ops = &sops;
	tar.rvsp_mode = true;

	mp = tmpfile();
	if (erofs_blocklist_open(mp, true))
		return 3;
	if (first) {
		g_sbi.bmgr = erofs_buffer_init(&g_sbi, 0);
		sb_bh = erofs_reserve_sb(g_sbi.bmgr);
		if (IS_ERR(sb_bh))
			return 4;
	} else {
		if (erofs_read_superblock(&g_sbi))
			return 4;
		g_sbi.bmgr = erofs_buffer_init(&g_sbi, g_sbi.primarydevice_blocks);
	}
	erofs_inode_manager_init();
	root = erofs_rebuild_make_root(&g_sbi);
	while (!(err = tarerofs_parse_tar(root, &tar)))
		;
	if (err < 0) {
		fprintf(stderr, "parse: %d\n", err);
		return 5;
	}
	if ((err = erofs_rebuild_dump_tree(root, !first))) {
		fprintf(stderr, "dump: %d\n", err);
		return 6;
	}
	if (erofs_bflush(g_sbi.bmgr, NULL))
		return 7;
	erofs_fixup_root_inode(root);
	erofs_iput(root);
	if (erofs_writesb(&g_sbi, sb_bh, &nblocks))
		return 8;
	if (erofs_bflush(g_sbi.bmgr, NULL))
		return 9;

	snprintf(path, sizeof(path), "%s.sectors", argv[3]);
	FILE *o = fopen(path, "wb");
	for (size_t i = 0; i < nsecs; i++) {
		fwrite(&secs[i].no, 8, 1, o);
		fwrite(secs[i].d, 1, SEC, o);
	}
	fclose(o);
	snprintf(path, sizeof(path), "%s.maps", argv[3]);
	o = fopen(path, "w");
	rewind(mp);
	while (getline(&line, &llen, mp) != -1) {
		uint64_t blk, toff;
		unsigned int nb, zeroed;
		int n = sscanf(line, "%" PRIx64 " %x%" PRIx64 "%u", &blk, &nb, &toff, &zeroed);
		uint64_t count = (uint64_t)nb * 4096;
		if (n > 3)
			count = (count - zeroed + SEC - 1) / SEC * SEC;
		fprintf(o, "%" PRIu64 " %" PRIu64 " %" PRIu64 "\n", blk * 4096, count, toff);
	}
	fclose(o);
	return 0;
}
