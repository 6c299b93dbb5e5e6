// SPDX-License-Identifier: GPL-2.0
/*
 * beekeeper RuntimeSecurityPolicy datapath: decides every exec from maps the node daemon fills.
 *
 *   rs_bprm_check  lsm/bprm_check_security: returns -EPERM, so execve() fails cleanly
 *   rs_exec        tracepoint sched/sched_process_exec: SIGKILL before the new program's
 *                  first instruction (the kernel delivers it on the return to user space)
 *
 * The daemon loads the first where the kernel allows BPF LSM programs and the second
 * otherwise (it tries, in that order). Per exec:
 *   1. the container: rs_scopes by the task's cgroup v2 id, else by its mount namespace
 *      inode (cgroup v1 hosts whose unified hierarchy does not hold per-container cgroups);
 *      no entry, no further work: host processes, the daemon and the kubelet never match;
 *   2. the file actually executed (bprm->file, or the new mm->exe_file): its (device,
 *      inode) in rs_files (exact paths, which symlinks, PATH lookups, relative paths and
 *      hard links all resolve to), else its parent directories up to RS_MAX_DEPTH,
 *      crossing mount points, against prefix entries (the nearest wins), else
 *      rs_defaults of the scope (allow-list posture);
 *   3. Block kills/denies, Audit reports, Allow stays silent; every Block and Audit is
 *      counted in rs_counts and sent to the daemon through the rs_events ring buffer.
 *
 * Built at build time with `clang -target bpf -O2 -g` (scripts/build_bpf.py). Kernel
 * structs are declared below with only the fields read, marked preserve_access_index:
 * libbpf relocates each access against the running kernel's BTF (CO-RE), so no kernel
 * headers are needed anywhere. Layouts of keys, values and events are mirrored in
 * node_daemon/runtime_maps.py (a test compares them with this object's BTF).
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define EPERM 1
#define SIGKILL 9
#define RS_MAX_DEPTH 32
#define RS_PATH_LEN 256
#define RS_NAME_LEN 64

#define RS_KEY_CGROUP 1
#define RS_KEY_MNTNS 2

#define RS_ALLOW 1
#define RS_AUDIT 2
#define RS_BLOCK 3

#define RS_HOOK_LSM 1
#define RS_HOOK_TRACEPOINT 2

#define RS_MATCH_PATH 1
#define RS_MATCH_PREFIX 2
#define RS_MATCH_DEFAULT 3

/* --- the kernel structs read (CO-RE) ---------------------------------------------------- */

struct qstr {
	const unsigned char *name;
} __attribute__((preserve_access_index));

struct super_block {
	__u32 s_dev;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct dentry {
	struct dentry *d_parent;
	struct qstr d_name;
	struct inode *d_inode;
} __attribute__((preserve_access_index));

struct vfsmount {
	struct dentry *mnt_root;
} __attribute__((preserve_access_index));

struct mount {
	struct mount *mnt_parent;
	struct dentry *mnt_mountpoint;
	struct vfsmount mnt;
} __attribute__((preserve_access_index));

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	struct path f_path;
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct mm_struct {
	struct file *exe_file;
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct mnt_namespace {
	struct ns_common ns;
} __attribute__((preserve_access_index));

struct nsproxy {
	struct mnt_namespace *mnt_ns;
} __attribute__((preserve_access_index));

struct task_struct {
	int tgid;
	struct mm_struct *mm;
	struct nsproxy *nsproxy;
	struct task_struct *real_parent;
	char comm[16];
} __attribute__((preserve_access_index));

struct linux_binprm {
	struct file *file;
	const char *filename;
} __attribute__((preserve_access_index));

/* --- maps (layouts mirrored in node_daemon/runtime_maps.py) ------------------------------ */

struct rs_scope_key {
	__u32 kind; /* RS_KEY_CGROUP or RS_KEY_MNTNS */
	__u32 pad;
	__u64 id;
};

struct rs_file_key {
	__u32 scope;
	__u32 dev; /* the kernel's dev_t: major << 20 | minor */
	__u64 ino;
};

struct rs_verdict {
	__u32 rule;     /* the daemon's rule id: policy, rule name and configured action */
	__u8 action;    /* what is done: RS_ALLOW, RS_AUDIT or RS_BLOCK (Audit mode already applied) */
	__u8 prefix;    /* 1: a directory entry of pathPrefixes (matches files beneath), 0: an exact file */
	__u8 pad[2];
};

struct rs_event {
	__u64 boot_ns;
	__u64 cgroup_id;
	__u64 ino;
	__u32 dev;
	__u32 pid;
	__u32 ppid;
	__u32 scope;
	__u32 rule;
	__u32 mntns;
	__u8 action;
	__u8 hook;
	__u8 match;
	__u8 pad[5];
	char comm[16];
	char parent_comm[16];
	char parent_exe[RS_NAME_LEN];
	char filename[RS_PATH_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct rs_scope_key);
	__type(value, __u32);
} rs_scopes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rs_file_key);
	__type(value, struct rs_verdict);
} rs_files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct rs_verdict);
} rs_defaults SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} rs_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} rs_events SEC(".maps");

/* --- decision ---------------------------------------------------------------------------- */

static __always_inline int rs_scope(struct task_struct *task, __u32 *scope, __u64 *cgroup_id, __u32 *mntns)
{
	struct rs_scope_key key = {.kind = RS_KEY_CGROUP};
	__u32 *found;

	key.id = bpf_get_current_cgroup_id();
	*cgroup_id = key.id;
	*mntns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
	found = bpf_map_lookup_elem(&rs_scopes, &key);
	if (!found) {
		key.kind = RS_KEY_MNTNS;
		key.id = *mntns;
		found = bpf_map_lookup_elem(&rs_scopes, &key);
	}
	if (!found)
		return 0;
	*scope = *found;
	return 1;
}

static __always_inline struct rs_verdict *rs_lookup(__u32 scope, struct dentry *dentry, int prefix)
{
	struct rs_file_key key = {.scope = scope};
	struct inode *inode = BPF_CORE_READ(dentry, d_inode);
	struct rs_verdict *verdict;

	if (!inode)
		return NULL;
	key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key.ino = BPF_CORE_READ(inode, i_ino);
	verdict = bpf_map_lookup_elem(&rs_files, &key);
	if (verdict && verdict->prefix == prefix)
		return verdict;
	return NULL;
}

/* The entry for the executed file: exact, else the nearest prefix directory, else the default. */
static __always_inline struct rs_verdict *rs_match(__u32 scope, struct file *file, __u8 *match)
{
	struct dentry *dentry = BPF_CORE_READ(file, f_path.dentry);
	struct vfsmount *vfsmnt = BPF_CORE_READ(file, f_path.mnt);
	struct rs_verdict *verdict;
	int i;

	verdict = rs_lookup(scope, dentry, 0);
	if (verdict) {
		*match = RS_MATCH_PATH;
		return verdict;
	}
	for (i = 0; i < RS_MAX_DEPTH; i++) {
		struct dentry *root = BPF_CORE_READ(vfsmnt, mnt_root);

		if (dentry == root) { /* the root of a mount: go on from its mount point in the parent */
			struct mount *mnt = container_of(vfsmnt, struct mount, mnt);
			struct mount *parent = BPF_CORE_READ(mnt, mnt_parent);

			if (parent == mnt)
				break;
			dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
			vfsmnt = (struct vfsmount *)((char *)parent + bpf_core_field_offset(struct mount, mnt));
			continue;
		}
		dentry = BPF_CORE_READ(dentry, d_parent);
		verdict = rs_lookup(scope, dentry, 1);
		if (verdict) {
			*match = RS_MATCH_PREFIX;
			return verdict;
		}
	}
	*match = RS_MATCH_DEFAULT;
	return bpf_map_lookup_elem(&rs_defaults, &scope);
}

static __always_inline void rs_report(struct task_struct *task, struct rs_verdict *verdict, __u32 scope,
				      struct file *file, __u64 cgroup_id, __u32 mntns, __u8 hook, __u8 match,
				      const char *filename)
{
	__u64 one = 1, *count;
	struct rs_event *event;
	struct task_struct *parent;
	const unsigned char *name;

	count = bpf_map_lookup_elem(&rs_counts, &verdict->rule);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&rs_counts, &verdict->rule, &one, BPF_NOEXIST);

	event = bpf_ringbuf_reserve(&rs_events, sizeof(*event), 0);
	if (!event)
		return;
	event->boot_ns = bpf_ktime_get_boot_ns();
	event->cgroup_id = cgroup_id;
	event->ino = BPF_CORE_READ(file, f_inode, i_ino);
	event->dev = BPF_CORE_READ(file, f_inode, i_sb, s_dev);
	event->pid = bpf_get_current_pid_tgid() >> 32;
	parent = BPF_CORE_READ(task, real_parent);
	event->ppid = BPF_CORE_READ(parent, tgid);
	event->scope = scope;
	event->rule = verdict->rule;
	event->mntns = mntns;
	event->action = verdict->action;
	event->hook = hook;
	event->match = match;
	__builtin_memset(event->pad, 0, sizeof(event->pad));
	bpf_get_current_comm(event->comm, sizeof(event->comm));
	BPF_CORE_READ_STR_INTO(&event->parent_comm, parent, comm);
	name = BPF_CORE_READ(parent, mm, exe_file, f_path.dentry, d_name.name);
	if (bpf_probe_read_kernel_str(event->parent_exe, sizeof(event->parent_exe), name) < 0)
		event->parent_exe[0] = 0;
	if (!filename || bpf_probe_read_kernel_str(event->filename, sizeof(event->filename), filename) < 0)
		event->filename[0] = 0;
	bpf_ringbuf_submit(event, 0);
}

/* RS_ALLOW, RS_AUDIT or RS_BLOCK for this exec (RS_ALLOW also when nothing matched). */
static __always_inline int rs_decide(struct file *file, __u8 hook, const char *filename)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct rs_verdict *verdict;
	__u64 cgroup_id;
	__u32 scope, mntns;
	__u8 match = 0;

	if (!file || !rs_scope(task, &scope, &cgroup_id, &mntns))
		return RS_ALLOW;
	verdict = rs_match(scope, file, &match);
	if (!verdict || verdict->action == RS_ALLOW)
		return RS_ALLOW;
	rs_report(task, verdict, scope, file, cgroup_id, mntns, hook, match, filename);
	return verdict->action;
}

SEC("lsm/bprm_check_security")
int BPF_PROG(rs_bprm_check, struct linux_binprm *bprm)
{
	struct file *file = BPF_CORE_READ(bprm, file);
	const char *filename = BPF_CORE_READ(bprm, filename);

	return rs_decide(file, RS_HOOK_LSM, filename) == RS_BLOCK ? -EPERM : 0;
}

struct rs_exec_args {
	__u64 common;
	__u32 filename_loc; /* __data_loc: offset in the low 16 bits, length in the high 16 */
	int pid;
	int old_pid;
};

SEC("tracepoint/sched/sched_process_exec")
int rs_exec(struct rs_exec_args *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file *file = BPF_CORE_READ(task, mm, exe_file);
	const char *filename = (const char *)ctx + (ctx->filename_loc & 0xFFFF);

	if (rs_decide(file, RS_HOOK_TRACEPOINT, filename) == RS_BLOCK)
		bpf_send_signal(SIGKILL);
	return 0;
}
