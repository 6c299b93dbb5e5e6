// SPDX-License-Identifier: GPL-2.0
/*
 * File opens per executable (keyed by the executable's inode): a CO-RE object, built once and
 * loaded on every node by libbpf, which relocates the task_struct reads against that node's BTF.
 *
 *   bpftool btf dump file /sys/kernel/btf/vmlinux format c > vmlinux.h
 *   clang -target bpf -g -O2 -D__TARGET_ARCH_x86 -c open_counts.bpf.c -o open_counts.o
 *   llvm-strip -g open_counts.o   # drops DWARF, keeps the BTF CO-RE needs
 *   kubectl create configmap open-counts -n default --from-file=open_counts.o
 *   kubectl apply -f bpfprogram-open-counts.yaml
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#ifndef STEP
#define STEP 1
#endif

char LICENSE[] SEC("license") = "GPL";

/* Set per BpfProgram with spec.globalData (base64 of the little-endian bytes). */
const volatile __u32 target_tgid = 0; /* only this process; 0 counts every process */
const volatile __u64 step = STEP;     /* added per open */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, __u64);
} opens_by_exe SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_openat")
int count_opens(void *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (target_tgid && tgid != target_tgid)
		return 0;
	struct task_struct *task = (void *)bpf_get_current_task();
	__u64 inode = BPF_CORE_READ(task, mm, exe_file, f_inode, i_ino);
	__u64 *count = bpf_map_lookup_elem(&opens_by_exe, &inode);

	if (count) {
		__sync_fetch_and_add(count, step);
	} else {
		__u64 first = step;

		bpf_map_update_elem(&opens_by_exe, &inode, &first, BPF_NOEXIST);
	}
	return 0;
}
