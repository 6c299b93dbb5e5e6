// SPDX-License-Identifier: GPL-2.0
/*
 * XDP multi-program dispatcher in the layout of libxdp's protocol (version 3), so
 * beekeeper and other libxdp users can share an interface: whoever comes second reads
 * this program's configuration from the kernel and builds the next dispatcher.
 *
 * The program on the interface is xdp_dispatcher. It calls the stub global functions
 * prog0..prog9 in order; each stub is replaced by a component XDP program (a
 * BPF_PROG_TYPE_EXT "freplace" program). After slot i returns action a, the chain goes
 * on only if bit a is set in chain_call_actions[i]; otherwise a is the verdict. A stub
 * that is not replaced returns DISPATCHER_RETVAL, whose bit every slot sets, so an
 * empty slot never ends the chain. Past the last enabled slot the verdict is XDP_PASS.
 *
 * conf lives in .rodata: the loader writes it before the load and the kernel freezes
 * it, so the verifier drops the calls of slots beyond num_progs_enabled. compat_test is
 * the target of the capability probe (an freplace of it says whether this kernel takes
 * extension programs at all); xdp_pass is the extension the probe loads.
 *
 * The numbers and the struct below are mirrored in node_daemon/xdp_dispatcher.py (a
 * unit test compares both).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define DISPATCHER_VERSION 3
#define DISPATCHER_MAGIC 236 /* 'X' + 'D' + 'P' */
#define DISPATCHER_RETVAL 31
#define DISPATCHER_SLOTS 10

struct xdp_dispatcher_config {
	__u8 magic;
	__u8 dispatcher_version;
	__u8 num_progs_enabled;
	__u8 is_xdp_frags;
	__u32 chain_call_actions[DISPATCHER_SLOTS];
	__u32 run_prios[DISPATCHER_SLOTS];
	__u32 program_flags[DISPATCHER_SLOTS];
	__u8 is_xdp_devbound;
};

/* const: frozen .rodata the verifier can prune on; volatile: the compiler must not fold
 * the zeroes it sees here, since the loader replaces them. */
static volatile const struct xdp_dispatcher_config conf = {};

/* A stub must not look constant to the compiler (volatile), and it calls
 * bpf_xdp_adjust_tail so that the kernel lets it be replaced by programs that
 * invalidate packet pointers. */
#define STUB(name)                                                  \
	__attribute__((noinline)) int name(struct xdp_md *ctx)      \
	{                                                           \
		volatile int ret = DISPATCHER_RETVAL;               \
		if (!ctx)                                           \
			return XDP_ABORTED;                         \
		bpf_xdp_adjust_tail(ctx, 0);                        \
		return ret;                                         \
	}

STUB(prog0)
STUB(prog1)
STUB(prog2)
STUB(prog3)
STUB(prog4)
STUB(prog5)
STUB(prog6)
STUB(prog7)
STUB(prog8)
STUB(prog9)

__attribute__((noinline)) int compat_test(struct xdp_md *ctx)
{
	volatile int ret = DISPATCHER_RETVAL;
	if (!ctx)
		return XDP_ABORTED;
	return ret;
}

#define SLOT(i, fn)                                                 \
	if (enabled < (i) + 1)                                      \
		return XDP_PASS;                                    \
	ret = fn(ctx);                                              \
	if (!((1U << ret) & conf.chain_call_actions[i]))            \
		return ret;

SEC("xdp")
int xdp_dispatcher(struct xdp_md *ctx)
{
	__u8 enabled = conf.num_progs_enabled;
	int ret;

	SLOT(0, prog0)
	SLOT(1, prog1)
	SLOT(2, prog2)
	SLOT(3, prog3)
	SLOT(4, prog4)
	SLOT(5, prog5)
	SLOT(6, prog6)
	SLOT(7, prog7)
	SLOT(8, prog8)
	SLOT(9, prog9)
	/* Keeps compat_test in the program (never reached with 10 slots or fewer). */
	if (enabled < DISPATCHER_SLOTS + 1)
		return XDP_PASS;
	compat_test(ctx);
	return XDP_PASS;
}

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
/* The protocol's BTF-encoded version: a variable whose type is a pointer to an array of
 * DISPATCHER_VERSION ints in the xdp_metadata section (libbpf's __uint encoding). */
__uint(dispatcher_version, DISPATCHER_VERSION) SEC("xdp_metadata");
