/*
 * /init of vmm's default guest: the first (and usually only) user process.
 *
 * 1. mount /proc, /sys and /dev (devtmpfs);
 * 2. tell vmm "init reached" through the boot-timer port;
 * 3. if vmm.root=DEV (or root=DEV) is on the kernel command line and we run
 *    from the initramfs, mount DEV and run the command inside it (chroot), so
 *    any Linux root file system works; booted without an initramfs
 *    (--initrd none root=/dev/vda), the kernel mounted it already;
 * 4. run the command vmm passed as vmm.argv=... (each argument
 *    percent-encoded, arguments separated by %00, so any argv survives the
 *    kernel's command-line parser), or an interactive shell when there is none;
 *    With vmm.mailbox on the command line (snapshots, `vmm run`'s warm start),
 *    the command comes instead through a mailbox: init tells vmm where its
 *    request buffer is and stops there, at the *ready point*; vmm saves the VM
 *    or delivers a request: argv, the host's wall-clock time and fresh entropy
 *    (a restored guest is a new machine: see docs/snapshots.md);
 * 5. report its exit status to vmm through the debug-exit port, which ends
 *    the VM at once (no shutdown sequence needed: nothing is left to flush
 *    that the guest kernel would write back... except dirty disk pages, so
 *    we sync() first, and remount a disk root read-only to leave it clean).
 *
 * Ports are reached with pwrite() on /dev/port: the kernel does the `out`
 * in kernel mode. Keep the port numbers in sync with vmm/arch/x86_64/layout.py
 * (the image builder passes them with -D).
 *
 * Built with musl-gcc -static (about 20 KiB) when available: every byte of
 * the initramfs costs unpack time in the guest.
 */
#define _GNU_SOURCE  /* O_PATH with glibc (musl has it anyway) */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <time.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <grp.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/sysmacros.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#ifndef EXIT_PORT
#error "EXIT_PORT must be defined (vmm/arch/x86_64/layout.py)"
#endif
#ifndef BOOT_TIMER_PORT
#error "BOOT_TIMER_PORT must be defined (vmm/arch/x86_64/layout.py)"
#endif

#ifndef MAILBOX_PORT
#error "MAILBOX_PORT must be defined (vmm/arch/x86_64/layout.py)"
#endif
#if !defined(MAILBOX_SIZE) || !defined(MAX_ARGS) || !defined(MAX_ENV) || !defined(MAX_MOUNTS) || \
    !defined(MAX_RLIMITS) || !defined(MAX_GROUPS) || !defined(MAX_PRELOAD)
#error "the mailbox's sizes must be defined (vmm/devices/mailbox.py, via vmm/images/initramfs.py)"
#endif
#if !defined(REQUEST_HEADER_SIZE) || !defined(REQUEST_PREPARE)
#error "the mailbox constants must be defined (vmm/devices/mailbox.py, via vmm/images/initramfs.py)"
#endif

#define BOOT_TIMER_INIT_REACHED 1
#define BOOT_TIMER_COMMAND_DONE 2
#define CMDLINE_MAX 4096

/* /dev/port, opened once: on PVM each system call is emulated kernel work
 * (an open and a close cost ~2 ms), and a restored VM has it open already. */
static void raw_output(int fd);

static int port_file(void)
{
    static int fd = -1;
    if (fd < 0)
        fd = open("/dev/port", O_WRONLY | O_CLOEXEC);
    return fd;
}

static void port_write(unsigned port, unsigned char value)
{
    if (pwrite(port_file(), &value, 1, port) != 1)
        dprintf(2, "vmm-init: /dev/port: %s\n", strerror(errno));
}

/*
 * The mailbox (vmm/devices/mailbox.py has the other side). Init fills in a
 * descriptor of its request buffer and writes its 16 bytes to the mailbox's
 * 16 ports (/dev/port writes consecutive ports). The last byte is the ready
 * point: vmm stops the VM there (to save it, or to deliver a request to a VM
 * restored from it) and writes the request straight into the buffer's
 * guest-physical pages, found through this process's page tables. So every
 * page of the buffer must be present before the descriptor goes out: the
 * memset does that (anonymous pages stay put: no swap in this guest).
 */

struct mailbox_descriptor {
    uint64_t address;   /* the request buffer, a virtual address in this process */
    uint32_t length;
    uint32_t magic;     /* written last: the ready point */
};

struct request {
    uint32_t magic;
    uint16_t version;
    uint16_t flags;
    uint32_t argc;
    uint32_t argv_bytes;  /* NUL-terminated arguments, one after the other */
    int64_t realtime_sec;  /* the host's CLOCK_REALTIME when vmm wrote this */
    uint32_t realtime_nsec;
    uint32_t seed_bytes;
    uint8_t seed[REQUEST_SEED_BYTES];  /* fresh host entropy for this run's CRNG */
    uint32_t settings_bytes;  /* container settings after the arguments (0: none) */
    uint32_t reserved;
    char argv[];
};
/* The layouts vmm writes (vmm/devices/mailbox.py): a mismatch fails the build. */
_Static_assert(sizeof(struct mailbox_descriptor) == MAILBOX_DESCRIPTOR_SIZE, "descriptor layout");
_Static_assert(sizeof(struct request) == REQUEST_HEADER_SIZE, "request layout");

/* From <linux/random.h>, which musl-gcc does not see: the ABI is fixed. */
struct rand_pool_info {
    int entropy_count;   /* bits credited */
    int buf_size;        /* bytes */
};
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#define RNDRESEEDCRNG _IO('R', 0x07)

static unsigned char mailbox[MAILBOX_SIZE] __attribute__((aligned(4096)));

/* Where a disk root is mounted ("/newroot" from the initramfs, "/" when the
 * kernel mounted it), or NULL. */
static const char *disk_root;
static int scratch_root;  /* a container's root: thrown away after the VM, never synced */
static int container_stderr = -1;  /* ttyS1, the second UART: a container's stderr */

static void finish(int status)
{
    /* The UART sends what the tty layer buffered as its interrupts come: wait
     * for the last bytes, or the exit port ends the VM before they are out. */
    tcdrain(1);
    if (container_stderr >= 0)
        tcdrain(container_stderr);
    /* A container's root disk is a scratch copy, deleted with the container
     * (as runc's overlay upper dir): nothing on it needs to reach the host. */
    if (!scratch_root) {
        sync();
        /* Leave the disk clean: on a read-only remount ext4 marks its journal
         * recovered, so the image needs no recovery at its next mount (which a
         * read-only attached disk could not do). Best effort: files still open for
         * writing (orphans) make it fail, and the sync() above is what counts. */
        if (disk_root)
            mount(NULL, disk_root, NULL, MS_REMOUNT | MS_RDONLY, NULL);
    }
    port_write(BOOT_TIMER_PORT, BOOT_TIMER_COMMAND_DONE);
    port_write(EXIT_PORT, (unsigned char)status);
    /* Not reached under vmm; under another VMM power off instead. */
    for (;;)
        pause();
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decode "a%20b%00c" in place into NUL-separated strings; fill argv. */
static int decode_argv(char *text, char **argv)
{
    int argc = 0;
    char *out = text, *start = text;
    for (char *in = text; *in; in++) {
        if (*in == '%' && hexval(in[1]) >= 0 && hexval(in[2]) >= 0) {
            char c = (char)(hexval(in[1]) * 16 + hexval(in[2]));
            in += 2;
            if (c == '\0') {
                *out++ = '\0';
                if (argc < MAX_ARGS - 1)
                    argv[argc++] = start;
                start = out;
                continue;
            }
            *out++ = c;
        } else {
            *out++ = *in;
        }
    }
    *out = '\0';
    if (argc < MAX_ARGS - 1)
        argv[argc++] = start;
    argv[argc] = NULL;
    return argc;
}

/* The value of key=VALUE on the kernel command line, copied into buf. */
static int cmdline_value(const char *cmdline, const char *key, char *buf, size_t size)
{
    size_t klen = strlen(key);
    for (const char *p = cmdline; (p = strstr(p, key)) != NULL; p += klen) {
        if ((p == cmdline || p[-1] == ' ') && p[klen] == '=') {
            const char *v = p + klen + 1;
            size_t n = strcspn(v, " \n");
            if (n >= size)
                n = size - 1;
            memcpy(buf, v, n);
            buf[n] = '\0';
            return 1;
        }
    }
    return 0;
}

/* Is the bare word (like "ro") on the kernel command line? */
static int cmdline_flag(const char *cmdline, const char *word)
{
    size_t len = strlen(word);
    for (const char *p = cmdline; (p = strstr(p, word)) != NULL; p += len)
        if ((p == cmdline || p[-1] == ' ') && (p[len] == ' ' || p[len] == '\n' || p[len] == '\0'))
            return 1;
    return 0;
}

static void mount_or_warn(const char *src, const char *dst, const char *type)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, 0, NULL) < 0 && errno != EBUSY)
        dprintf(2, "vmm-init: mount %s on %s: %s\n", type, dst, strerror(errno));
}

#define RAMFS_MAGIC 0x858458f6
#define TMPFS_MAGIC 0x01021994

/* Are we the initramfs's /init (root on ramfs), or /sbin/init on a real disk? */
static int running_from_initramfs(void)
{
    struct statfs fs;
    return statfs("/", &fs) == 0 && (fs.f_type == RAMFS_MAGIC || fs.f_type == TMPFS_MAGIC);
}

/* Mount a disk at /newroot, trying the usual file system types. */
static void mount_root(const char *device, int read_only)
{
    static const char *types[] = {"ext4", "ext3", "ext2", "btrfs", "xfs", "vfat", NULL};
    int why = ENODEV;  /* ENODEV: "no such file system type"; report a more telling errno */
    mkdir("/newroot", 0755);
    for (const char **t = types; *t; t++) {
        if (mount(device, "/newroot", *t, read_only ? MS_RDONLY : 0, NULL) == 0)
            return;
        if (why == ENODEV || why == EINVAL)  /* EINVAL: not this type's superblock */
            why = errno;
    }
    dprintf(2, "vmm-init: cannot mount root %s%s: %s\n", device,
            read_only ? " read-only" : "", strerror(why));
    finish(126);
}

static void enter_root(const char *device, int read_only)
{
    mount_root(device, read_only);
    /* Give the new root the same /proc, /sys, /dev. */
    mount_or_warn("proc", "/newroot/proc", "proc");
    mount_or_warn("sysfs", "/newroot/sys", "sysfs");
    mount_or_warn("devtmpfs", "/newroot/dev", "devtmpfs");
    if (chroot("/newroot") < 0 || chdir("/") < 0) {
        dprintf(2, "vmm-init: chroot %s: %s\n", device, strerror(errno));
        finish(126);
    }
}

/* Stop at the ready point; return the request vmm delivered (NULL if none). */
static struct request *wait_for_request(void)
{
    struct mailbox_descriptor ready = {
        .address = (uint64_t)(uintptr_t)mailbox, .length = sizeof(mailbox),
        .magic = MAILBOX_MAGIC,  /* "VMMR" */
    };
    memset(mailbox, 0, sizeof(mailbox));
    if (pwrite(port_file(), &ready, sizeof(ready), MAILBOX_PORT) != sizeof(ready)) {
        dprintf(2, "vmm-init: mailbox: %s\n", strerror(errno));
        return NULL;
    }
    /* ...a restored VM goes on from here, with the request in the mailbox. */
    struct request *request = (struct request *)mailbox;
    if (request->magic != REQUEST_MAGIC /* "VMRQ" */ || request->version != REQUEST_VERSION ||
        request->seed_bytes > sizeof(request->seed) ||
        request->argv_bytes > sizeof(mailbox) - sizeof(*request) ||
        request->settings_bytes > sizeof(mailbox) - sizeof(*request) - request->argv_bytes ||
        request->argc >= MAX_ARGS) {
        dprintf(2, "vmm-init: mailbox: no valid request from vmm\n");
        return NULL;
    }
    return request;
}

/* A restored VM is a new machine: the host's wall-clock time, fresh entropy. */
static void become_new_machine(const struct request *request)
{
    struct timespec now = {.tv_sec = request->realtime_sec, .tv_nsec = request->realtime_nsec};
    if (clock_settime(CLOCK_REALTIME, &now) < 0)
        dprintf(2, "vmm-init: clock_settime: %s\n", strerror(errno));
    if (!request->seed_bytes)
        return;
    /* Mix the seed into the input pool, credited, then make the CRNG reseed
     * from it now: without the reseed the CRNG would go on from the state it
     * had in the snapshot, the same in every VM restored from it. */
    struct {
        struct rand_pool_info info;
        uint8_t bytes[sizeof(request->seed)];
    } entropy;
    entropy.info.entropy_count = (int)request->seed_bytes * 8;
    entropy.info.buf_size = (int)request->seed_bytes;
    memcpy(entropy.bytes, request->seed, request->seed_bytes);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &entropy) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0)
        dprintf(2, "vmm-init: reseeding the CRNG: %s\n", strerror(errno));
    if (fd >= 0)
        close(fd);
}

/* argv from the request's NUL-separated strings (bounded by argv_bytes). */
static int request_argv(struct request *request, char **argv)
{
    char *p = request->argv, *end = request->argv + request->argv_bytes;
    int argc = 0;
    while (argc < (int)request->argc && p < end) {
        char *nul = memchr(p, '\0', (size_t)(end - p));
        if (!nul)
            break;
        argv[argc++] = p;
        p = nul + 1;
    }
    argv[argc] = NULL;
    return argc;
}

/*
 * Container settings (vmm/oci/: an OCI bundle run as a VM). They follow the
 * arguments in the request as NUL-terminated "key=value" strings; the host
 * has already turned config.json into these, mount options into MS_* flags.
 * The root's settings:
 *
 *   root=DEV  root_ro=1      the container's root file system, a disk
 *   wait_root=1              ... put behind its device just now: wait for its size
 *   mount=TYPE\tSOURCE\tTARGET\tFLAGS\tDATA   in the order given, under the root
 *   preload=PATH             a file of the root to read into the page cache
 *
 * and the process's:
 *
 *   hostname=NAME  cwd=DIR   env=NAME=VALUE (the whole environment)
 *   rlimit=RESOURCE SOFT HARD  groups=G,G  gid=G  uid=U
 *
 * The root is prepared by init itself as soon as its settings arrive: the
 * disk mounted at /newroot, the mounts made under it, the preloads read.
 * A request flagged REQUEST_PREPARE carries only those, and init goes back
 * to its ready point afterwards: vmm saves the VM there (the *image base* of
 * vmm/oci/monitor.py), so a later container of the same image is restored
 * with its root mounted and its programs in the page cache, and the next
 * request brings the process. Settings are parsed in place (no allocation:
 * the child of vfork may only make system calls); the child applies the
 * process's in the order runc does: hostname, chroot, cwd, rlimits, groups,
 * gid, uid, exec.
 */

struct container_mount {
    char *type, *source, *target, *data;
    unsigned long flags;
};

struct container {
    int active;
    int prepared;  /* its root is mounted at /newroot, its mounts made */
    char *root;
    int root_ro;
    int wait_root;  /* the root disk was put in after a restore: wait for its size */
    char *hostname, *cwd;
    char *env[MAX_ENV + 1];
    int envc;
    struct container_mount mounts[MAX_MOUNTS];
    int mountc;
    struct { int resource; struct rlimit limit; } rlimits[MAX_RLIMITS];
    int rlimitc;
    char *preload[MAX_PRELOAD];
    int preloadc;
    gid_t groups[MAX_GROUPS];
    int groupc;
    uid_t uid;
    gid_t gid;
};

static struct container container;
extern char **environ;

/* Split s at the next tab (in place); return what follows, or NULL. */
static char *next_field(char *s)
{
    char *tab = s ? strchr(s, '\t') : NULL;
    if (!tab)
        return NULL;
    *tab = '\0';
    return tab + 1;
}

static int parse_settings(char *p, char *end, struct container *c)
{
    c->active = 1;
    while (p < end) {
        char *nul = memchr(p, '\0', (size_t)(end - p));
        if (!nul)
            return -1;
        char *value = strchr(p, '=');
        if (!value)
            return -1;
        *value++ = '\0';
        if (!strcmp(p, "root")) {
            c->root = value;
        } else if (!strcmp(p, "root_ro")) {
            c->root_ro = 1;
        } else if (!strcmp(p, "wait_root")) {
            c->wait_root = 1;
        } else if (!strcmp(p, "preload")) {
            if (c->preloadc >= MAX_PRELOAD || value[0] != '/')
                return -1;
            c->preload[c->preloadc++] = value;
        } else if (!strcmp(p, "hostname")) {
            c->hostname = value;
        } else if (!strcmp(p, "cwd")) {
            c->cwd = value;
        } else if (!strcmp(p, "env")) {
            if (c->envc >= MAX_ENV)
                return -1;
            c->env[c->envc++] = value;
        } else if (!strcmp(p, "uid")) {
            c->uid = (uid_t)strtoul(value, NULL, 10);
        } else if (!strcmp(p, "gid")) {
            c->gid = (gid_t)strtoul(value, NULL, 10);
        } else if (!strcmp(p, "groups")) {
            for (char *g = value; *g && c->groupc < MAX_GROUPS;) {
                size_t len = strcspn(g, ",");
                c->groups[c->groupc++] = (gid_t)strtoul(g, NULL, 10);
                g += len + (g[len] == ',');
            }
        } else if (!strcmp(p, "rlimit")) {
            if (c->rlimitc >= MAX_RLIMITS)
                return -1;
            char *soft, *hard;
            int resource = (int)strtol(value, &soft, 10);
            c->rlimits[c->rlimitc].resource = resource;
            c->rlimits[c->rlimitc].limit.rlim_cur = strtoull(soft, &hard, 10);
            c->rlimits[c->rlimitc].limit.rlim_max = strtoull(hard, NULL, 10);
            c->rlimitc++;
        } else if (!strcmp(p, "mount")) {
            if (c->mountc >= MAX_MOUNTS)
                return -1;
            struct container_mount *m = &c->mounts[c->mountc];
            m->type = value;
            m->source = next_field(m->type);
            m->target = next_field(m->source);
            char *flags = next_field(m->target);
            m->data = next_field(flags);
            if (!m->data || m->target[0] != '/')
                return -1;
            m->flags = strtoul(flags, NULL, 10);
            c->mountc++;
        } else {
            return -1;
        }
        p = nul + 1;
    }
    c->env[c->envc] = NULL;
    return 0;
}

/*
 * mkdir -p of a mount point that follows symlinks, dangling ones included, and
 * makes the directories where they lead, as runc does. Called chrooted in the
 * container's root, so an absolute link starts from that root and ".." stops
 * at it. `path` is the part resolved so far, `rest` what is left to walk.
 */
static void make_mount_point(const char *target)
{
    char path[PATH_MAX] = "", rest[PATH_MAX], link[PATH_MAX];
    int links = 0;
    if (snprintf(rest, sizeof(rest), "%s", target) >= (int)sizeof(rest))
        return;
    char *next = rest;
    while (*next) {
        while (*next == '/')
            next++;
        char *end = next + strcspn(next, "/");
        size_t len = (size_t)(end - next), at = strlen(path);
        if (len == 0 || (len == 1 && next[0] == '.')) {
            next = end;
            continue;
        }
        if (len == 2 && next[0] == '.' && next[1] == '.') {
            char *last = strrchr(path, '/');  /* NULL at the root: ".." stops there */
            if (last)
                *last = '\0';
            next = end;
            continue;
        }
        if (at + 1 + len >= sizeof(path))
            return;
        path[at] = '/';
        memcpy(path + at + 1, next, len);
        path[at + 1 + len] = '\0';
        struct stat st;
        if (lstat(path, &st) < 0) {
            if (errno != ENOENT || mkdir(path, 0755) < 0)
                return;
        } else if (S_ISLNK(st.st_mode)) {
            ssize_t n = readlink(path, link, sizeof(link) - 1);
            if (n <= 0 || ++links > 40)
                return;
            link[n] = '\0';
            path[link[0] == '/' ? 0 : at] = '\0';  /* absolute: from the root */
            if ((size_t)n + 1 + strlen(end) >= sizeof(rest))
                return;
            memmove(rest + n + 1, end, strlen(end) + 1);  /* the link's target, then the rest */
            memcpy(rest, link, (size_t)n);
            rest[n] = '/';
            next = rest;
            continue;
        }
        next = end;
    }
}

/* What runc puts in a container's /dev when config.json mounts a tmpfs there. */
static void populate_dev(const char *dev)  /* "/dev", inside the container's root */
{
    static const struct { const char *name; unsigned major, minor; } nodes[] = {
        {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9},
        {"tty", 5, 0}, {"console", 5, 1},  /* our stdio is /dev/console: ttyname() finds it */
    };
    static const struct { const char *name, *to; } links[] = {
        {"fd", "/proc/self/fd"}, {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"},
        {"stderr", "/proc/self/fd/2"}, {"ptmx", "pts/ptmx"},
    };
    char path[PATH_MAX + 16];
    for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dev, nodes[i].name);
        mknod(path, S_IFCHR | 0666, makedev(nodes[i].major, nodes[i].minor));
        chmod(path, 0666);  /* mknod's mode is masked by the umask */
    }
    for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dev, links[i].name);
        symlink(links[i].to, path);
    }
}

static void fail(const char *what, const char *detail)
{
    dprintf(2, "vmm-init: %s %s: %s\n", what, detail, strerror(errno));
    _exit(126);
}

static void wait_for_disk(const char *device);

/* Output as it is written: no "\n" -> "\r\n", and no wait for a modem's carrier. */
static void raw_output(int fd)
{
    struct termios tio;
    if (tcgetattr(fd, &tio) == 0) {
        tio.c_oflag &= ~OPOST;
        tio.c_cflag |= CLOCAL;
        tcsetattr(fd, TCSANOW, &tio);
    }
}

/*
 * A container's stderr: the second UART (ttyS1) that vmm adds for containers
 * (VmConfig.stderr_uart), apart from the console's stdout, as the shim's two
 * FIFOs are. Opened once, by init, while the root is prepared (opening a
 * serial port sets the UART up: port I/O, emulated work on PVM); without it
 * (another VMM) stderr stays on the console.
 */
static void open_container_stderr(void)
{
    if (container_stderr >= 0)
        return;
    container_stderr = open("/dev/ttyS1", O_WRONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (container_stderr < 0)
        return;
    raw_output(container_stderr);
    fcntl(container_stderr, F_SETFL, 0);  /* blocking writes from here on */
}

/*
 * The container's root, by init itself (a mount is the same for every
 * process: one namespace): the disk at /newroot, the mounts under it, the
 * preloaded files read ahead into the page cache. Any failure ends the VM.
 */
static void prepare_root(const struct container *c)
{
    if (c->wait_root)
        wait_for_disk(c->root);
    mount_root(c->root, c->root_ro);
    /* The mounts and the read-ahead from inside the container's root (chroot),
     * so that the image's symlinks and ".." resolve as they will for the
     * container and never into the initramfs: what runc gets from
     * openat2(RESOLVE_IN_ROOT). `outside` brings init back. */
    int outside = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC), dev = -1;
    if (outside < 0 || chroot("/newroot") < 0 || chdir("/") < 0) {
        dprintf(2, "vmm-init: chroot /newroot: %s\n", strerror(errno));
        finish(126);
    }
    for (int i = 0; i < c->mountc; i++) {
        const struct container_mount *m = &c->mounts[i];
        struct stat st;  /* one system call when the parent exists */
        if (mkdir(m->target, 0755) < 0 && stat(m->target, &st) < 0)  /* missing, or a dangling link */
            make_mount_point(m->target);
        if (mount(m->source, m->target, m->type, m->flags, m->data[0] ? m->data : NULL) < 0) {
            dprintf(2, "vmm-init: mount %s: %s\n", m->target, strerror(errno));
            finish(126);
        }
        if (!strcmp(m->type, "tmpfs") && !strcmp(m->target, "/dev")) {
            populate_dev(m->target);
            dev = open(m->target, O_PATH | O_DIRECTORY | O_CLOEXEC);
        }
    }
    /* Read ahead, not read: the blocks go from the disk into the page cache
     * with no copy into this process (a copy is emulated work on PVM). */
    for (int i = 0; i < c->preloadc; i++) {
        int fd = open(c->preload[i], O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd >= 0) {
            posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
            close(fd);
        }
    }
    if (fchdir(outside) < 0 || chroot(".") < 0) {
        dprintf(2, "vmm-init: back from /newroot: %s\n", strerror(errno));
        finish(126);
    }
    /* The very console our stdio is open on (as runc bind-mounts the pty), so that
     * ttyname() finds the same inode: a process can tell its terminal. Through
     * the initramfs's /proc/self/fd/0 (the container may mount no /proc): the
     * kernel opened the initramfs's own /dev/console for us, which the devtmpfs
     * on /dev now hides. */
    if (dev >= 0 && fchdir(dev) == 0)
        mount("/proc/self/fd/0", "console", NULL, MS_BIND, NULL);
    if (dev >= 0)
        close(dev);
    close(outside);
    chdir("/");
    open_container_stderr();
}

/*
 * A request's container settings into `container`; root settings are applied
 * at once (prepare_root). A process's settings need a root, given now or in an
 * earlier request, and a root is prepared once. -1: settings vmm never sends.
 */
static int take_settings(struct request *request)
{
    int prepared = container.prepared;
    memset(&container, 0, sizeof(container));  /* the last request's strings are gone */
    container.prepared = prepared;
    char *settings = request->argv + request->argv_bytes;
    if (parse_settings(settings, settings + request->settings_bytes, &container) < 0)
        return -1;
    if (container.root) {
        if (container.prepared)
            return -1;
        prepare_root(&container);
        container.prepared = 1;
    }
    return container.prepared ? 0 : -1;
}

/* In the child: become the container's process, up to (not including) the exec. */
static void enter_container(const struct container *c)
{
    if (c->hostname && sethostname(c->hostname, strlen(c->hostname)) < 0)
        fail("sethostname", c->hostname);
    if (chroot("/newroot") < 0)
        fail("chroot", c->root);
    if (chdir(c->cwd ? c->cwd : "/") < 0)
        fail("chdir", c->cwd ? c->cwd : "/");
    for (int i = 0; i < c->rlimitc; i++)
        if (setrlimit(c->rlimits[i].resource, &c->rlimits[i].limit) < 0)
            fail("setrlimit", "");
    /* Each change of credentials makes a new set (~4 ms each on PVM): only
     * what differs from init's own (root, no supplementary groups). */
    if ((c->groupc || getgroups(0, NULL) != 0) && setgroups((size_t)c->groupc, c->groups) < 0)
        fail("setgroups", "");
    if (c->gid != getgid() && setgid(c->gid) < 0)
        fail("setgid", "");
    if (c->uid != getuid() && setuid(c->uid) < 0)
        fail("setuid", "");
}

/*
 * A root disk put behind its device after a restore (vmm/oci/monitor.py): the
 * driver learns the new size from a configuration-change interrupt, in a
 * kernel worker; wait until the block device has it (a few ms).
 */
static void wait_for_disk(const char *device)
{
    char path[128], buf[32];
    const char *name = strrchr(device, '/');
    snprintf(path, sizeof(path), "/sys/block/%s/size", name ? name + 1 : device);
    for (int i = 0; i < 5000; i++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n > 0) {
            buf[n] = '\0';
            if (strtoull(buf, NULL, 10) > 0)
                return;
        }
        usleep(1000);
    }
    dprintf(2, "vmm-init: %s: still empty after 5 s\n", device);
}

/* $PATH of an environment (NULL-terminated NAME=VALUE list), or NULL. */
static const char *env_path(char *const *env)
{
    for (; env && *env; env++)
        if (!strncmp(*env, "PATH=", 5))
            return *env + 5;
    return NULL;
}

/*
 * The program execvp would run, found with stat(): execvp tries execve in
 * each PATH directory, and on Linux a failed execve still sets up and tears
 * down a new address space before it looks for the file (measured on PVM:
 * ~25 ms for each of the 5 misses before /bin); access() allocates and frees
 * a set of credentials each time (~3 ms). Returns name itself when it holds
 * a '/', NULL when no directory has it.
 */
static const char *find_program(const char *name, const char *dirs, char *buf, size_t size)
{
    if (strchr(name, '/'))
        return name;
    while (dirs && *dirs) {
        size_t len = strcspn(dirs, ":");
        if (len && len + 1 + strlen(name) < size) {
            memcpy(buf, dirs, len);
            buf[len] = '/';
            strcpy(buf + len + 1, name);
            struct stat st;
            if (stat(buf, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111))
                return buf;
        }
        dirs += len + (dirs[len] == ':');
    }
    return NULL;
}

int main(void)
{
    static char cmdline[CMDLINE_MAX], encoded[CMDLINE_MAX], root[256];
    char *argv[MAX_ARGS];
    char *shell[] = {"/bin/sh", NULL};

    mount_or_warn("proc", "/proc", "proc");
    mount_or_warn("sysfs", "/sys", "sysfs");
    mount_or_warn("devtmpfs", "/dev", "devtmpfs");
    port_write(BOOT_TIMER_PORT, BOOT_TIMER_INIT_REACHED);

    /* Before the ready point, so that a restored VM has them already (on PVM
     * the first setenv's heap and a console's termios change cost ~35 ms):
     * our environment, and a console that leaves "\n" alone, for a command
     * whose output goes to the host's stdout (a pipe, a file); a terminal
     * gets its output processing back below. */
    setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
    setenv("HOME", "/root", 1);
    setenv("TERM", "dumb", 1);
    raw_output(1);

    int fd = open("/proc/cmdline", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof(cmdline) - 1) : -1;
    if (fd >= 0)
        close(fd);
    cmdline[n > 0 ? n : 0] = '\0';

    int interactive, terminal = 0;
    struct request *request = NULL;
    if (cmdline_flag(cmdline, "vmm.mailbox") && (request = wait_for_request()) != NULL) {
        become_new_machine(request);
        /* A container's root first, then back to the ready point for its process. */
        while (request->flags & REQUEST_PREPARE) {
            if (!request->settings_bytes || take_settings(request) < 0)
                break;
            if ((request = wait_for_request()) == NULL)
                finish(126);
            become_new_machine(request);
        }
        if ((request->flags & REQUEST_PREPARE) || (container.prepared && !request->settings_bytes) ||
            (request->settings_bytes && take_settings(request) < 0)) {
            dprintf(2, "vmm-init: mailbox: bad container settings from vmm\n");
            finish(126);
        }
        interactive = (request->flags & REQUEST_INTERACTIVE) || request_argv(request, argv) == 0;
        /* A container's process.terminal: its own args, on the console as a terminal. */
        if (request->settings_bytes && request_argv(request, argv) > 0) {
            terminal = interactive;
            interactive = 0;
        }
    } else {
        interactive = !cmdline_value(cmdline, "vmm.argv", encoded, sizeof(encoded));
        if (!interactive)
            decode_argv(encoded, argv);
    }
    char **args = interactive ? shell : argv;

    if (interactive || terminal) {
        /* A terminal: "\n" as "\r\n" again. */
        struct termios tio;
        if (tcgetattr(1, &tio) == 0) {
            tio.c_oflag |= OPOST;
            tcsetattr(1, TCSANOW, &tio);
        }
    }
    if (interactive)
        setenv("TERM", "vt100", 1);

    int from_initramfs = running_from_initramfs();
    int root_given = cmdline_value(cmdline, "vmm.root", root, sizeof(root)) ||
                     cmdline_value(cmdline, "root", root, sizeof(root));
    disk_root = !from_initramfs ? "/" : root_given ? "/newroot" : NULL;
    /* A container's process gets exactly its own environment and PATH. */
    char *const *envp = environ;
    const char *search = getenv("PATH");
    if (container.active) {
        disk_root = "/newroot";
        scratch_root = 1;
        envp = container.env;
        search = env_path(container.env);
        if (!search)
            search = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    }

    /* vfork, not fork: the child borrows our memory until it execs, so the
     * kernel copies no page tables and nothing takes copy-on-write faults
     * afterwards (on PVM every one of those is emulated kernel work). The
     * child only makes system calls before exec or _exit, and chroot/setsid
     * change only its own process state. */
    static char path[PATH_MAX];
    pid_t child = vfork();
    if (child == 0) {
        if (container.active) {
            if (!terminal && container_stderr >= 0)
                dup2(container_stderr, 2);  /* the copy is not close-on-exec */
            enter_container(&container);
        } else if (from_initramfs && root_given) {
            enter_root(root, cmdline_flag(cmdline, "ro"));
        }
        if (interactive || terminal) {
            /* A session with the console as controlling tty: job control, ^C. */
            setsid();
            ioctl(0, TIOCSCTTY, 1);
        }
        const char *program = find_program(args[0], search, path, sizeof(path));
        if (program)
            execve(program, args, envp);
        else if (container.active)
            errno = ENOENT;  /* a container has only its own programs */
        else if (strchr(args[0], '/') == NULL)
            /* The initramfs links only a few applets (each link costs boot
             * time); busybox runs any other by its argv[0]. */
            execv("/bin/busybox", args);
        else
            errno = ENOENT;
        dprintf(2, "vmm-init: %s: %s\n", args[0], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    if (child < 0) {
        dprintf(2, "vmm-init: fork: %s\n", strerror(errno));
        finish(126);
    }
    /* PID 1 reaps every orphan; the command's own status is what we report. */
    int status = 0;
    for (;;) {
        int st;
        pid_t pid = wait(&st);
        if (pid == child) {
            status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            break;
        }
        if (pid < 0 && errno == ECHILD)
            break;
    }
    finish(status);
    return 0;
}
