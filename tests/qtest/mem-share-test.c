/*
 * QTest for the mem-share memory backend
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include <grp.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include "qemu/cutils.h"
#include "qemu/units.h"
#include "qemu/bswap.h"
#include "libqtest.h"
#include "libqos/malloc-pc.h"
#include "libqos/pci-pc.h"
#include "libqos/virtio.h"
#include "libqos/virtio-pci.h"
#include "standard-headers/linux/virtio_config.h"
#include "standard-headers/linux/virtio_mem.h"
#include "qapi/error.h"
#include "qobject/qdict.h"
#include "qobject/qjson.h"
#include "qobject/qlist.h"
#include "qobject/qstring.h"

#define RAM_SIZE        (128 * MiB)
#define PAGE            4096
#define KSM_DIR         "/sys/kernel/mm/ksm"

/*
 * Why QEMU, which runs with the test's credentials, cannot use mode=user
 * here, or NULL if it can: mode=user needs userfaultfd with
 * write-protection of anonymous memory, from the system call (root,
 * CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1) or /dev/userfaultfd,
 * as hw/mem-share/merge.c opens it.  run-tests counts skips whose reason
 * names userfaultfd.
 */
static const char *uffd_missing(void)
{
    static char *why;
    static bool probed;
    struct uffdio_api api = { .api = UFFD_API };
    int fd;

    if (probed) {
        return why;
    }
    probed = true;
    fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
#ifdef USERFAULTFD_IOC_NEW
    if (fd < 0) {
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);

        if (dev >= 0) {
            fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
            close(dev);
        }
    }
#endif
    if (fd < 0) {
        why = g_strdup_printf("mode=user needs userfaultfd: not available "
                              "(%s; needs root, CAP_SYS_PTRACE or access "
                              "to /dev/userfaultfd)", g_strerror(errno));
    } else if (ioctl(fd, UFFDIO_API, &api) < 0 ||
               !(api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
        why = g_strdup("mode=user needs userfaultfd write-protection of "
                       "anonymous memory, which this kernel lacks");
    }
    if (fd >= 0) {
        close(fd);
    }
    return why;
}

/* A test that runs mode=user: skipped, saying why, without userfaultfd */
static void run_uffd_test(const void *fn)
{
    if (uffd_missing()) {
        g_test_skip(uffd_missing());
        return;
    }
    ((void (*)(void))fn)();
}

static void add_uffd_test(const char *path, void (*fn)(void))
{
    qtest_add_data_func(path, (const void *)fn, run_uffd_test);
}

/* Run QEMU outside qtest to see how it fails (or not) at start-up */
static int run_qemu(const char *args, char **out, char **err)
{
    g_autofree char *cmd = g_strdup_printf("%s -machine none -nodefaults "
                                           "-display none %s",
                                           getenv("QTEST_QEMU_BINARY"), args);
    g_auto(GStrv) argv = NULL;
    g_autoptr(GError) gerr = NULL;
    int status;

    g_assert(g_shell_parse_argv(cmd, NULL, &argv, NULL));
    g_assert(g_spawn_sync(NULL, argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                          out, err, &status, &gerr));
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static QTestState *start_vm(const char *mode, const char *extra)
{
    return qtest_initf("-machine pc,memory-backend=m0 -m 128M "
                       "-object mem-share,id=m0,size=128M,mode=%s %s",
                       mode, extra ? extra : "");
}

static QDict *query_one(QTestState *qts)
{
    QDict *resp = qtest_qmp(qts, "{ 'execute': 'query-mem-share' }");
    QList *list = qdict_get_qlist(resp, "return");
    QDict *info;

    g_assert(list);
    g_assert_cmpint(qlist_size(list), ==, 1);
    info = qobject_to(QDict, qlist_peek(list));
    qobject_ref(info);
    qobject_unref(resp);
    return info;
}

/* /proc/PID/@file, PID (QEMU's) read from @pidfile */
static char *proc_path(const char *pidfile, const char *file)
{
    g_autofree char *pid = NULL;

    g_assert(g_file_get_contents(pidfile, &pid, NULL, NULL));
    return g_strdup_printf("/proc/%d/%s", atoi(pid), file);
}

/* The content of /proc/PID/@file, PID (QEMU's) read from @pidfile */
static char *proc_file(const char *pidfile, const char *file)
{
    g_autofree char *path = proc_path(pidfile, file);
    char *text = NULL;

    g_assert(g_file_get_contents(path, &text, NULL, NULL));
    return text;
}

/* The VmFlags of the mapping that holds the guest RAM */
static char *ram_vmflags(const char *pidfile)
{
    g_autofree char *smaps = proc_file(pidfile, "smaps");
    g_auto(GStrv) lines = g_strsplit(smaps, "\n", -1);
    bool in_ram = false;

    for (char **l = lines; *l; l++) {
        unsigned long start, end;

        if (sscanf(*l, "%lx-%lx ", &start, &end) == 2) {
            /* QEMU may align the block: the RAM is the mapping of its size */
            in_ram = end - start >= RAM_SIZE &&
                     end - start < RAM_SIZE + 4 * MiB;
        } else if (in_ram && g_str_has_prefix(*l, "VmFlags:")) {
            return g_strdup(*l);
        }
    }
    g_assert_not_reached();
}

static bool vmflags_mergeable(const char *pidfile)
{
    g_autofree char *flags = ram_vmflags(pidfile);

    return strstr(flags, " mg") != NULL;
}

/* The generic backend's 'merge' property must follow the mode */
static bool qom_get_merge(QTestState *qts)
{
    QDict *resp = qtest_qmp(qts, "{ 'execute': 'qom-get', 'arguments': "
                            "{ 'path': '/objects/m0', 'property': 'merge' } }");
    bool merge = qdict_get_bool(resp, "return");

    qobject_unref(resp);
    return merge;
}

static void test_help(void)
{
    g_autofree char *out = NULL, *err = NULL;

    g_assert_cmpint(run_qemu("-object mem-share,help", &out, &err), ==, 0);
    g_assert(strstr(out, "mem-share options:"));
    g_assert(strstr(out, "mode=<MemShareMode>"));
    g_assert(strstr(out, "Deduplication mode"));
    /* Inherited from the generic memory backend */
    g_assert(strstr(out, "size=<int>"));
    g_assert(strstr(out, "prealloc=<bool>"));
    g_assert(strstr(out, "host-nodes="));
    g_assert(strstr(out, "policy=<HostMemPolicy>"));
    g_assert(strstr(out, "dump=<bool>"));
    g_assert(strstr(out, "mem-path=<string>"));
}

static void test_cmdline_errors(void)
{
    static const struct {
        const char *args;
        const char *msg;
    } cases[] = {
        { "-object mem-share,id=m0,size=0",
          "property 'size' of mem-share doesn't take value '0'" },
        { "-object mem-share,id=m0,size=1000",
          "size must be a non-zero multiple of the host page size" },
        { "-object mem-share,id=m0,size=64M,share=on",
          "share=on is not supported" },
        { "-object mem-share,id=m0,size=64M,mode=user,max-cpu=0",
          "max-cpu must be between 1 and 100" },
        { "-object mem-share,id=m0,size=64M,mode=user,stable-scans=17",
          "stable-scans must be between 0 and 16" },
        { "-object mem-share,id=m0,size=64M,mode=user,map-budget=95",
          "map-budget must be between 1 and 90" },
        { "-object mem-share,id=m0,size=64M,mode=fast",
          "Parameter 'mode' does not accept value 'fast'" },
        { "-object mem-share,id=m0,size=64M,mode=user,dirty-tracking=pml",
          "Parameter 'dirty-tracking' does not accept value 'pml'" },
        { "-object mem-share,id=m0,size=64M,mem-path=/dev/hugepages",
          "mem-path is not supported" },
        { "-object '{\"qom-type\":\"mem-share\",\"id\":\"m0\",\"size\":4097}'",
          "size must be a non-zero multiple" },
        { "-object mem-share,id=m0,size=64M,mode=user,group=g1",
          "group and broker go together" },
        { "-object mem-share,id=m0,size=64M,mode=user,group=-x,broker=/b",
          "group '-x' is not a valid name" },
        { "-object mem-share,id=m0,size=64M,mode=user,group=g1,"
          "broker=/nonexistent/broker.sock",
          "cannot join group 'g1' at broker /nonexistent/broker.sock" },
        { "-object mem-share,id=m0,size=64M,mode=user,group=g1,broker=/b,"
          "broker-uid=no-such-user-ms19",
          "broker-uid 'no-such-user-ms19' is neither a uid (0 to 4294967294)"
          " nor a user of this host" },
        { "-object mem-share,id=m0,size=64M,mode=user,group=g1,broker=/b,"
          "broker-uid=4294967295",
          "broker-uid '4294967295' is neither a uid" },
    };

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *out = NULL, *err = NULL;

        g_assert_cmpint(run_qemu(cases[i].args, &out, &err), ==, 1);
        if (!strstr(err, cases[i].msg)) {
            g_error("'%s': expected '%s' in: %s", cases[i].args,
                    cases[i].msg, err);
        }
    }
}

static void test_qmp_errors(void)
{
    static const struct {
        const char *props;
        const char *msg;
    } cases[] = {
        { "'size': 0", "doesn't take value '0'" },
        { "'size': 4097", "size must be a non-zero multiple" },
        { "'size': 67108864, 'share': true", "share=on is not supported" },
        { "'size': 67108864, 'mode': 'user', 'max-cpu': 101",
          "max-cpu must be between 1 and 100" },
        { "'size': 67108864, 'mode': 'x'", "does not accept value 'x'" },
        { "'size': 67108864, 'mem-path': '/tmp'", "mem-path is not supported" },
    };
    QTestState *qts = qtest_init("-machine none");

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *props = g_strdup_printf(
            "{ 'qom-type': 'mem-share', 'id': 'e%zu', %s }", i,
            cases[i].props);
        QDict *resp = qtest_qmp(qts, "{ 'execute': 'object-add', "
                                "'arguments': %p }",
                                qobject_from_json(props, &error_abort));
        QDict *error = qdict_get_qdict(resp, "error");

        g_assert(error);
        if (!strstr(qdict_get_str(error, "desc"), cases[i].msg)) {
            g_error("%s: expected '%s', got '%s'", cases[i].props,
                    cases[i].msg, qdict_get_str(error, "desc"));
        }
        qobject_unref(resp);
    }
    /* None of the failed objects stayed behind */
    qtest_qmp_assert_success(qts, "{ 'execute': 'object-add', 'arguments': "
                             "{ 'qom-type': 'mem-share', 'id': 'ok', "
                             "'size': 67108864, 'mode': 'kernel' } }");
    qobject_unref(query_one(qts));
    qtest_quit(qts);
}

static void test_query_off(void)
{
    QTestState *qts = start_vm("off", NULL);
    QDict *info = query_one(qts);

    g_assert_cmpstr(qdict_get_str(info, "id"), ==, "m0");
    g_assert_cmpstr(qdict_get_str(info, "mode"), ==, "off");
    g_assert_cmpuint(qdict_get_int(info, "size"), ==, RAM_SIZE);
    g_assert_cmpuint(qdict_get_int(info, "page-size"), ==, PAGE);
    g_assert_cmpuint(qdict_get_int(info, "pages-merged"), ==, 0);
    g_assert_cmpuint(qdict_get_int(info, "pages-zero"), ==, 0);
    g_assert_cmpuint(qdict_get_int(info, "scan-cpu-ns"), ==, 0);
    g_assert(!qdict_haskey(info, "kernel"));
    qobject_unref(info);
    qtest_quit(qts);
}

static void test_query_kernel(void)
{
    QTestState *qts = start_vm("kernel", NULL);
    QDict *info = query_one(qts);
    QDict *k = qdict_get_qdict(info, "kernel");
    static const char *const keys[] = {
        "running", "per-object", "pages-ksm", "pages-zero-pfn",
        "use-zero-pages", "merging-pages", "zero-pages", "rmap-items",
        "process-profit", "pages-shared", "pages-sharing", "pages-unshared",
        "pages-volatile",
    };

    g_assert_cmpstr(qdict_get_str(info, "mode"), ==, "kernel");
    g_assert(k);
    for (size_t i = 0; i < G_N_ELEMENTS(keys); i++) {
        g_assert(qdict_haskey(k, keys[i]));
    }
    g_assert_cmpuint(qdict_get_int(info, "pages-merged"), >=,
                     qdict_get_int(info, "pages-zero"));
    g_assert_cmpuint(qdict_get_int(info, "pages-merged"), <=,
                     RAM_SIZE / PAGE);
    /* Figures the host publishes must come through */
    if (access(KSM_DIR "/full_scans", R_OK) == 0) {
        g_autofree char *scans = NULL;

        g_assert(g_file_get_contents(KSM_DIR "/full_scans", &scans, NULL,
                                     NULL));
        g_assert_cmpuint(qdict_get_int(info, "full-scans"), <=,
                         g_ascii_strtoull(scans, NULL, 10));
    }
    /* Page frame numbers are readable for root only */
    g_assert(qdict_get_bool(k, "per-object") == (geteuid() == 0));
    qobject_unref(info);
    qtest_quit(qts);
}

static void test_mergeable_flag(void)
{
    g_autofree char *pidfile = g_strdup_printf("%s/mem-share-test-%d.pid",
                                               g_get_tmp_dir(), getpid());
    g_autofree char *args = g_strdup_printf("-pidfile %s", pidfile);
    QTestState *qts;

    /* mode=off stays unmergeable even with the machine's mem-merge=on */
    qts = start_vm("off", args);
    g_assert(!vmflags_mergeable(pidfile));
    qtest_quit(qts);

    /* mode=kernel is mergeable even with mem-merge=off */
    qts = qtest_initf("-machine pc,memory-backend=m0,mem-merge=off -m 128M "
                      "-object mem-share,id=m0,size=128M,mode=kernel %s",
                      args);
    g_assert(vmflags_mergeable(pidfile));

    /* Run-time switches between off and kernel */
    qtest_qmp_assert_success(qts, "{ 'execute': 'qom-set', 'arguments': "
                             "{ 'path': '/objects/m0', 'property': 'mode', "
                             "'value': 'off' } }");
    g_assert(!vmflags_mergeable(pidfile));
    g_assert_false(qom_get_merge(qts));
    qtest_qmp_assert_success(qts, "{ 'execute': 'qom-set', 'arguments': "
                             "{ 'path': '/objects/m0', 'property': 'mode', "
                             "'value': 'kernel' } }");
    g_assert(vmflags_mergeable(pidfile));
    g_assert_true(qom_get_merge(qts));
    qtest_quit(qts);
    unlink(pidfile);
}

static void qom_set_mode(QTestState *qts, const char *mode)
{
    qtest_qmp_assert_success(qts, "{ 'execute': 'qom-set', 'arguments': "
                             "{ 'path': '/objects/m0', 'property': 'mode', "
                             "'value': %s } }", mode);
}

static void test_runtime_modes(void)
{
    QTestState *qts = start_vm("kernel", NULL);
    static const char *const modes[] = { "user", "off", "user", "kernel",
                                         "off", "kernel" };
    QDict *resp, *info;

    for (size_t i = 0; i < G_N_ELEMENTS(modes); i++) {
        qom_set_mode(qts, modes[i]);
        info = query_one(qts);
        g_assert_cmpstr(qdict_get_str(info, "mode"), ==, modes[i]);
        g_assert(qdict_haskey(info, "user") == !strcmp(modes[i], "user"));
        g_assert(qdict_haskey(info, "kernel") == !strcmp(modes[i], "kernel"));
        qobject_unref(info);
    }

    /* Creation-time properties stay put */
    resp = qtest_qmp(qts, "{ 'execute': 'qom-set', 'arguments': "
                     "{ 'path': '/objects/m0', 'property': 'stable-scans', "
                     "'value': 3 } }");
    g_assert(strstr(qdict_get_str(qdict_get_qdict(resp, "error"), "desc"),
                    "can only be set when the object is created"));
    qobject_unref(resp);
    qtest_quit(qts);
}

static void test_numa_memdev(void)
{
    QTestState *qts = qtest_init("-m 128M -object mem-share,id=m0,size=128M,"
                                 "mode=kernel -numa node,memdev=m0");
    QDict *info = query_one(qts);

    g_assert_cmpstr(qdict_get_str(info, "mode"), ==, "kernel");
    qobject_unref(info);
    qtest_quit(qts);
}

static void test_query_stats(void)
{
    QTestState *qts = start_vm("kernel", NULL);
    QDict *resp;
    QList *results, *stats;
    QDict *result;
    QListEntry *e;
    int found = 0;

    resp = qtest_qmp(qts, "{ 'execute': 'query-stats', 'arguments': "
                     "{ 'target': 'vm', 'providers': "
                     "[ { 'provider': 'mem-share' } ] } }");
    results = qdict_get_qlist(resp, "return");
    g_assert_cmpint(qlist_size(results), ==, 1);
    result = qobject_to(QDict, qlist_peek(results));
    g_assert_cmpstr(qdict_get_str(result, "provider"), ==, "mem-share");
    g_assert_cmpstr(qdict_get_str(result, "qom-path"), ==, "/objects/m0");
    stats = qdict_get_qlist(result, "stats");
    QLIST_FOREACH_ENTRY(stats, e) {
        QDict *s = qobject_to(QDict, qlist_entry_obj(e));
        const char *name = qdict_get_str(s, "name");

        if (!strcmp(name, "size")) {
            g_assert_cmpuint(qdict_get_int(s, "value"), ==, RAM_SIZE);
        }
        found += !strcmp(name, "pages-merged") || !strcmp(name, "size") ||
                 !strcmp(name, "scan-cpu-ns");
    }
    g_assert_cmpint(found, ==, 3);
    qobject_unref(resp);

    /* Name filtering */
    resp = qtest_qmp(qts, "{ 'execute': 'query-stats', 'arguments': "
                     "{ 'target': 'vm', 'providers': "
                     "[ { 'provider': 'mem-share', 'names': ['full-scans'] } ]"
                     " } }");
    results = qdict_get_qlist(resp, "return");
    result = qobject_to(QDict, qlist_peek(results));
    g_assert_cmpint(qlist_size(qdict_get_qlist(result, "stats")), ==, 1);
    qobject_unref(resp);

    resp = qtest_qmp(qts, "{ 'execute': 'query-stats-schemas', 'arguments': "
                     "{ 'provider': 'mem-share' } }");
    results = qdict_get_qlist(resp, "return");
    g_assert_cmpint(qlist_size(results), ==, 1);
    result = qobject_to(QDict, qlist_peek(results));
    g_assert_cmpstr(qdict_get_str(result, "target"), ==, "vm");
    g_assert_cmpint(qlist_size(qdict_get_qlist(result, "stats")), ==, 7);
    qobject_unref(resp);
    qtest_quit(qts);
}

static void test_hmp(void)
{
    QTestState *qts = start_vm("kernel", NULL);
    g_autofree char *out = qtest_hmp(qts, "info mem-share");
    g_autofree char *none = NULL;

    g_assert(strstr(out, "m0: mode kernel, size 128 MiB"));
    g_assert(strstr(out, "pages merged"));
    g_assert(strstr(out, "host KSM"));
    qtest_quit(qts);

    qts = qtest_init("-machine none");
    none = qtest_hmp(qts, "info mem-share");
    g_assert(strstr(none, "No mem-share memory backends"));
    qtest_quit(qts);
}

/*
 * Host KSM is a host-wide setting: the test that needs it running saves
 * every setting it touches and restores them, also when it fails (it runs
 * in a subprocess, and the parent restores).
 */
static const char *const ksm_knobs[] = { "run", "pages_to_scan",
                                         "sleep_millisecs" };

static void ksm_write(const char *knob, const char *value)
{
    g_autofree char *path = g_strdup_printf(KSM_DIR "/%s", knob);
    FILE *f = fopen(path, "w");

    /* sysfs: no g_file_set_contents(), which writes a file and renames it */
    g_assert(f);
    g_assert_cmpint(fputs(value, f), >=, 0);
    g_assert_cmpint(fclose(f), ==, 0);
}

static uint64_t ksm_read(const char *knob)
{
    g_autofree char *path = g_strdup_printf(KSM_DIR "/%s", knob);
    g_autofree char *text = NULL;

    g_assert(g_file_get_contents(path, &text, NULL, NULL));
    return g_ascii_strtoull(text, NULL, 10);
}

static uint64_t proc_merging_pages(const char *pidfile)
{
    g_autofree char *text = proc_file(pidfile, "ksm_merging_pages");

    return g_ascii_strtoull(text, NULL, 10);
}

#define DUP_PAGES   2048
#define ZERO_PAGES  1024
#define DUP_BASE    (32 * MiB)
#define ZERO_BASE   (48 * MiB)

static void ksm_merge_child(void)
{
    g_autofree char *pidfile = g_strdup_printf("%s/mem-share-ksm-%d.pid",
                                               g_get_tmp_dir(), getpid());
    g_autofree char *args = g_strdup_printf("-pidfile %s", pidfile);
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autofree uint8_t *back = g_malloc(PAGE);
    QTestState *qts;
    QDict *info, *k;
    uint64_t merged = 0, scans;

    ksm_write("pages_to_scan", "5000");
    ksm_write("sleep_millisecs", "10");
    ksm_write("run", "1");

    qts = qtest_initf("-machine pc,memory-backend=m0,mem-merge=off -m 128M "
                      "-object mem-share,id=m0,size=128M,mode=kernel %s",
                      args);
    for (int i = 0; i < PAGE; i++) {
        page[i] = i * 7 + 3;
    }
    for (int i = 0; i < DUP_PAGES; i++) {
        qtest_memwrite(qts, DUP_BASE + (uint64_t)i * PAGE, page, PAGE);
    }
    qtest_memset(qts, ZERO_BASE, 0, ZERO_PAGES * PAGE);

    /* ksmd needs two passes to merge; allow it plenty of time */
    for (int tries = 0; tries < 600; tries++) {
        info = query_one(qts);
        merged = qdict_get_int(info, "pages-merged");
        qobject_unref(info);
        if (merged >= DUP_PAGES + ZERO_PAGES) {
            break;
        }
        g_usleep(100 * 1000);
    }
    g_assert_cmpuint(merged, >=, DUP_PAGES + ZERO_PAGES);

    /*
     * Let ksmd settle (nothing is written any more) and compare the
     * object's census with the kernel's count for the whole process:
     * mem-merge=off leaves the backend the only mergeable memory.
     */
    scans = ksm_read("full_scans");
    while (ksm_read("full_scans") < scans + 2) {
        g_usleep(20 * 1000);
    }
    info = query_one(qts);
    k = qdict_get_qdict(info, "kernel");
    g_assert_true(qdict_get_bool(k, "running"));
    g_assert_true(qdict_get_bool(k, "per-object"));
    g_assert_cmpuint(qdict_get_int(k, "pages-ksm"), ==,
                     proc_merging_pages(pidfile));
    g_assert_cmpuint(qdict_get_int(info, "pages-zero"), >=, ZERO_PAGES);
    g_assert_cmpuint(qdict_get_int(info, "full-scans"), >=, scans + 2);
    g_assert_cmpuint(qdict_get_int(info, "pages-scanned"), >, 0);
    qobject_unref(info);

    /* Merging changed no byte */
    for (int i = 0; i < DUP_PAGES; i++) {
        qtest_memread(qts, DUP_BASE + (uint64_t)i * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
    memset(page, 0, PAGE);
    for (int i = 0; i < ZERO_PAGES; i++) {
        qtest_memread(qts, ZERO_BASE + (uint64_t)i * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
    qtest_quit(qts);
    unlink(pidfile);
}

static void test_ksm_merge(void)
{
    char *saved[G_N_ELEMENTS(ksm_knobs)] = { 0 };

    if (g_test_subprocess()) {
        ksm_merge_child();
        return;
    }
    if (geteuid() != 0 || access(KSM_DIR "/run", W_OK) != 0) {
        g_test_skip("needs root and a writable " KSM_DIR);
        return;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(ksm_knobs); i++) {
        g_autofree char *path = g_strdup_printf(KSM_DIR "/%s", ksm_knobs[i]);

        g_assert(g_file_get_contents(path, &saved[i], NULL, NULL));
    }
    g_test_trap_subprocess(NULL, 0,
                           G_TEST_SUBPROCESS_INHERIT_STDOUT |
                           G_TEST_SUBPROCESS_INHERIT_STDERR);
    for (size_t i = G_N_ELEMENTS(ksm_knobs); i-- > 0;) {
        ksm_write(ksm_knobs[i], saved[i]);
        g_free(saved[i]);
    }
    g_test_trap_assert_passed();
}

/*
 * mode=user: the scanner merges what qtest writes.  Duplicates of a few
 * contents and zero pages are written into the guest RAM; untouched RAM
 * is never populated and is not counted.
 */
#define U_DUP_PAGES     2048
#define U_CONTENTS      4
#define U_ZERO_PAGES    1024
#define U_DUP_BASE      (32 * MiB)
#define U_ZERO_BASE     (48 * MiB)

static void fill_content(uint8_t *page, int content)
{
    for (int i = 0; i < PAGE; i++) {
        page[i] = i * (content + 3) + content;
    }
}

/*
 * Anonymous memory of the guest RAM, in KiB: the sum over the mappings
 * inside the RAM's range, which merging splits.  *start is found on the
 * first call, while the RAM is still one mapping of its size.
 */
static uint64_t ram_anon_kb(const char *pidfile, unsigned long *start)
{
    g_autofree char *smaps = proc_file(pidfile, "smaps");
    g_auto(GStrv) lines = g_strsplit(smaps, "\n", -1);
    bool inside = false;
    uint64_t kb = 0;

    for (char **l = lines; *l; l++) {
        unsigned long s, e;

        if (sscanf(*l, "%lx-%lx ", &s, &e) == 2) {
            if (!*start && e - s >= RAM_SIZE && e - s < RAM_SIZE + 4 * MiB) {
                *start = s;
            }
            inside = *start && s >= *start && e <= *start + RAM_SIZE + 4 * MiB;
        } else if (inside && g_str_has_prefix(*l, "Anonymous:")) {
            kb += g_ascii_strtoull(*l + strlen("Anonymous:"), NULL, 10);
        }
    }
    g_assert(*start);
    return kb;
}

static QDict *wait_user(QTestState *qts, const char *key, uint64_t min)
{
    for (int tries = 0; tries < 1200; tries++) {
        QDict *info = query_one(qts);
        QDict *user = qdict_get_qdict(info, "user");

        g_assert(user);
        if ((qdict_haskey(info, key) ? qdict_get_int(info, key) :
             qdict_get_int(user, key)) >= min) {
            return info;
        }
        qobject_unref(info);
        g_usleep(50 * 1000);
    }
    g_error("%s never reached %" PRIu64, key, min);
}

static void write_dups(QTestState *qts, uint64_t base, int n)
{
    g_autofree uint8_t *page = g_malloc(PAGE);

    for (int i = 0; i < n; i++) {
        fill_content(page, i % U_CONTENTS);
        qtest_memwrite(qts, base + (uint64_t)i * PAGE, page, PAGE);
    }
}

static void check_dups(QTestState *qts, uint64_t base, int n, int except)
{
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autofree uint8_t *back = g_malloc(PAGE);

    for (int i = 0; i < n; i++) {
        if (i == except) {
            continue;
        }
        fill_content(page, i % U_CONTENTS);
        qtest_memread(qts, base + (uint64_t)i * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
}

static void check_zero(QTestState *qts, uint64_t base, int n)
{
    g_autofree uint8_t *back = g_malloc(PAGE);

    for (int i = 0; i < n; i++) {
        qtest_memread(qts, base + (uint64_t)i * PAGE, back, PAGE);
        g_assert(buffer_is_zero(back, PAGE));
    }
}

/* mode=off: nothing stays merged, the duplicates read back unchanged */
static void unmerge_and_check(QTestState *qts)
{
    QDict *info;

    qom_set_mode(qts, "off");
    info = query_one(qts);
    g_assert_cmpuint(qdict_get_int(info, "pages-merged"), ==, 0);
    qobject_unref(info);
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, -1);
}

static void test_user_merge(void)
{
    g_autofree char *pidfile = g_strdup_printf("%s/mem-share-user-%d.pid",
                                               g_get_tmp_dir(), getpid());
    g_autofree char *args = g_strdup_printf("-pidfile %s", pidfile);
    g_autofree uint8_t *page = g_malloc(PAGE);
    QTestState *qts = start_vm("off", args);
    uint64_t anon_before, anon_after, merged, cow, shared;
    unsigned long ram = 0;
    QDict *info, *user;

    /* Fill first, measure, then let the scanner loose */
    write_dups(qts, U_DUP_BASE, U_DUP_PAGES);
    qtest_memset(qts, U_ZERO_BASE, 0, U_ZERO_PAGES * PAGE);
    anon_before = ram_anon_kb(pidfile, &ram);
    qom_set_mode(qts, "user");

    /* Every duplicate and every zero page merges, onto one page per content */
    info = wait_user(qts, "pages-merged", U_DUP_PAGES + U_ZERO_PAGES);
    user = qdict_get_qdict(info, "user");
    g_assert_cmpuint(qdict_get_int(info, "pages-zero"), >=, U_ZERO_PAGES);
    g_assert_cmpuint(qdict_get_int(user, "pages-shared"), >=, U_DUP_PAGES);
    g_assert_cmpuint(qdict_get_int(user, "store-pages"), >=, U_CONTENTS);
    g_assert_cmpuint(qdict_get_int(user, "bytes-saved"), >=,
                     (uint64_t)(U_DUP_PAGES - U_CONTENTS + U_ZERO_PAGES) *
                     PAGE);
    g_assert_cmpuint(qdict_get_int(info, "pages-scanned"), >, 0);
    g_assert_cmpuint(qdict_get_int(info, "scan-cpu-ns"), >, 0);
    merged = qdict_get_int(info, "pages-merged");
    shared = qdict_get_int(user, "pages-shared");
    cow = qdict_get_int(info, "cow-breaks");
    qobject_unref(info);

    /* The host really freed the memory */
    anon_after = ram_anon_kb(pidfile, &ram);
    g_assert_cmpuint(anon_before - MIN(anon_before, anon_after), >=,
                     (U_DUP_PAGES + U_ZERO_PAGES) * 4);

    /* Merging changed no byte */
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, -1);
    check_zero(qts, U_ZERO_BASE, U_ZERO_PAGES);

    /* A write breaks the sharing of that page only */
    memset(page, 0xab, PAGE);
    qtest_memwrite(qts, U_DUP_BASE + 5 * PAGE, page, PAGE);
    info = wait_user(qts, "cow-breaks", cow + 1);
    g_assert_cmpuint(qdict_get_int(info, "cow-breaks"), ==, cow + 1);
    g_assert_cmpuint(qdict_get_int(qdict_get_qdict(info, "user"),
                                   "pages-shared"), ==, shared - 1);
    qobject_unref(info);
    qtest_memread(qts, U_DUP_BASE + 5 * PAGE, page, PAGE);
    g_assert_cmpint(page[0], ==, 0xab);
    g_assert_cmpint(page[PAGE - 1], ==, 0xab);
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, 5);

    /* Identical again: merged again */
    fill_content(page, 5 % U_CONTENTS);
    qtest_memwrite(qts, U_DUP_BASE + 5 * PAGE, page, PAGE);
    info = wait_user(qts, "remerges", 1);
    g_assert_cmpuint(qdict_get_int(info, "pages-merged"), >=, merged);
    /* Broken a few passes after its merge: merging it again is upkeep */
    user = qdict_get_qdict(info, "user");
    g_assert_cmpuint(qdict_get_int(user, "merges-upkeep"), ==,
                     qdict_get_int(user, "remerges"));
    qobject_unref(info);
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, -1);

    /* Unmerge: every page private again, nothing changed */
    unmerge_and_check(qts);
    check_zero(qts, U_ZERO_BASE, U_ZERO_PAGES);
    g_assert_cmpuint(ram_anon_kb(pidfile, &ram), >=,
                     anon_after + U_DUP_PAGES * 4);

    qtest_quit(qts);
    unlink(pidfile);
}

/*
 * dirty-tracking=kvm: the scanner follows QEMU's dirty log (here the
 * writes of device emulation, qtest's memwrite): stable private pages are
 * not read again, and a page written with a duplicate's content is hashed
 * again because the log says it was written.
 */
#define D_UNIQUE_BASE   (40 * MiB)
#define D_UNIQUE_PAGES  256

static void test_user_dirty_log(void)
{
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autofree uint8_t *back = g_malloc(PAGE);
    QTestState *qts = start_vm("off,dirty-tracking=kvm", NULL);
    uint64_t merged, dirty, skips, scans;
    QDict *info, *user;

    write_dups(qts, U_DUP_BASE, U_DUP_PAGES);
    for (int i = 0; i < D_UNIQUE_PAGES; i++) {
        memset(page, 0, PAGE);
        memcpy(page, &i, sizeof(i));
        page[PAGE - 1] = 0x5a;
        qtest_memwrite(qts, D_UNIQUE_BASE + (uint64_t)i * PAGE, page, PAGE);
    }
    qom_set_mode(qts, "user");
    info = wait_user(qts, "pages-merged", U_DUP_PAGES);
    user = qdict_get_qdict(info, "user");
    g_assert_cmpstr(qdict_get_str(user, "dirty-tracking"), ==, "kvm");
    scans = qdict_get_int(info, "full-scans");
    g_test_message("after the snapshot: full-scans %" PRIu64
                   ", pages-merged %" PRIu64, scans,
                   (uint64_t)qdict_get_int(info, "pages-merged"));
    qobject_unref(info);

    /* Nothing written: the unique pages are not read again */
    info = wait_user(qts, "full-scans", scans + 2);
    user = qdict_get_qdict(info, "user");
    g_assert_cmpuint(qdict_get_int(user, "hash-skips"), >=, D_UNIQUE_PAGES);
    dirty = qdict_get_int(user, "pages-dirty");
    skips = qdict_get_int(user, "hash-skips");
    merged = qdict_get_int(info, "pages-merged");
    qobject_unref(info);

    /* A unique page becomes a duplicate: the log tells, it merges */
    fill_content(page, 1);
    qtest_memwrite(qts, D_UNIQUE_BASE + 7 * PAGE, page, PAGE);
    info = wait_user(qts, "pages-merged", merged + 1);
    user = qdict_get_qdict(info, "user");
    g_assert_cmpuint(qdict_get_int(user, "pages-dirty"), >, dirty);
    g_assert_cmpuint(qdict_get_int(user, "hash-skips"), >, skips);
    qobject_unref(info);
    qtest_memread(qts, D_UNIQUE_BASE + 7 * PAGE, back, PAGE);
    g_assert(memcmp(back, page, PAGE) == 0);
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, -1);

    /* Unmerge works as without the log */
    unmerge_and_check(qts);
    qtest_quit(qts);
}

/* Lines of the log file @path that name trace event @event */
static unsigned count_trace(const char *path, const char *event)
{
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    unsigned n = 0;

    g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        n += strstr(*l, event) != NULL;
    }
    return n;
}

/*
 * With the dirty log (the default), a quiet guest costs passes paced in
 * time, not spinning ones: at most one every 0.5 s, and none of them
 * reads a page, since nothing was written.  The log is synced 4 times
 * in the period of a pass, so as the passes slow down (at most one every
 * 4 s) so do the syncs, which were 10 a second whatever the pace.
 */
static void test_user_pacing(void)
{
    g_autofree char *log = NULL;
    g_autofree char *args = NULL;
    QTestState *qts;
    QDict *info, *user;
    uint64_t scans, visited, skips;
    unsigned syncs;
    int fd;

    fd = g_file_open_tmp("mem-share-trace-XXXXXX", &log, NULL);
    g_assert_cmpint(fd, >=, 0);
    close(fd);
    args = g_strdup_printf("-trace mem_share_dirty_sync -D %s", log);
    qts = start_vm("user", args);
    info = wait_user(qts, "full-scans", 4);
    user = qdict_get_qdict(info, "user");
    g_assert_cmpstr(qdict_get_str(user, "dirty-tracking"), ==, "kvm");
    scans = qdict_get_int(info, "full-scans");
    visited = qdict_get_int(info, "pages-scanned");
    skips = qdict_get_int(user, "hash-skips");
    qobject_unref(info);
    syncs = count_trace(log, "mem_share_dirty_sync ");
    g_usleep(5 * G_USEC_PER_SEC);
    info = query_one(qts);
    user = qdict_get_qdict(info, "user");
    syncs = count_trace(log, "mem_share_dirty_sync ") - syncs;
    g_test_message("5 s: %" PRIu64 " passes, %" PRIu64 " pages visited, "
                   "%u syncs of the log",
                   qdict_get_int(info, "full-scans") - scans,
                   qdict_get_int(info, "pages-scanned") - visited, syncs);
    g_assert_cmpuint(qdict_get_int(info, "full-scans"), >, scans);
    g_assert_cmpuint(qdict_get_int(info, "full-scans"), <=, scans + 12);
    g_assert_cmpuint(qdict_get_int(info, "pages-scanned"), ==, visited);
    g_assert_cmpuint(qdict_get_int(user, "hash-skips"), >, skips);
    /* Every 100 ms would be 50; every 125 ms, at the fastest pace, 40 */
    g_assert_cmpuint(syncs, >, 0);
    g_assert_cmpuint(syncs, <, 25);
    qobject_unref(info);
    qtest_quit(qts);
    unlink(log);
}

/* Whether the page at host address @host of QEMU's is present */
static bool host_page_present(const char *pidfile, unsigned long host)
{
    g_autofree char *path = proc_path(pidfile, "pagemap");
    uint64_t e = 0;
    int fd;

    fd = open(path, O_RDONLY);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pread(fd, &e, sizeof(e), host / PAGE * sizeof(e)), ==,
                    sizeof(e));
    close(fd);
    return e >> 63;
}

/*
 * One write to a 2 MiB range of guest RAM nobody touched faults in a
 * whole transparent huge page on the host: 511 zero pages the dirty log
 * never reports.  query-mem-share counts the fill (huge-fills), and the
 * zeros are merged without waiting for the rolling sweep.
 */
static void test_user_huge_fill(void)
{
    g_autofree char *pidfile = g_strdup_printf("%s/mem-share-huge-%d.pid",
                                               g_get_tmp_dir(), getpid());
    g_autofree char *args = g_strdup_printf("-pidfile %s", pidfile);
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autofree uint8_t *back = g_malloc(PAGE);
    QTestState *qts = start_vm("off", args);
    unsigned long start = 0, huge = 2 * MiB, host;
    uint64_t fills, zeros, gpa;
    QDict *info;

    /* The RAM's mapping, found before the store's view of its size */
    ram_anon_kb(pidfile, &start);
    qom_set_mode(qts, "user");
    /* Past the first passes, which count the ranges QEMU wrote at start */
    info = wait_user(qts, "full-scans", 2);
    fills = qdict_get_int(qdict_get_qdict(info, "user"), "huge-fills");
    zeros = qdict_get_int(info, "pages-zero");
    qobject_unref(info);

    /* A huge-page range of the RAM's upper half, which nothing touched */
    host = ROUND_UP(start + 96 * MiB, huge);
    gpa = host - start;
    g_assert(!host_page_present(pidfile, host));
    fill_content(page, 1);
    qtest_memwrite(qts, gpa + 5 * PAGE, page, PAGE);
    if (!host_page_present(pidfile, host)) {
        g_test_skip("the write faulted in no huge page (THP off?)");
        qtest_quit(qts);
        unlink(pidfile);
        return;
    }
    qobject_unref(wait_user(qts, "huge-fills", fills + 1));
    qobject_unref(wait_user(qts, "pages-zero", zeros + huge / PAGE - 1));
    qtest_memread(qts, gpa + 5 * PAGE, back, PAGE);
    g_assert(memcmp(back, page, PAGE) == 0);
    memset(page, 0, PAGE);
    for (uint64_t i = 0; i < huge / PAGE; i++) {
        if (i != 5) {
            qtest_memread(qts, gpa + i * PAGE, back, PAGE);
            g_assert(memcmp(back, page, PAGE) == 0);
        }
    }
    qtest_quit(qts);
    unlink(pidfile);
}

/* A scanner slowed to a crawl still scans everything on request */
static void test_user_scan_now(void)
{
    QTestState *qts = start_vm("user", "-object mem-share,id=k0,size=4M,"
                               "mode=kernel");
    QDict *resp, *info;
    uint64_t scans;

    qtest_qmp_assert_success(qts, "{ 'execute': 'qom-set', 'arguments': "
                             "{ 'path': '/objects/m0', 'property': "
                             "'scan-rate', 'value': 1 } }");
    resp = qtest_qmp(qts, "{ 'execute': 'query-mem-share' }");
    info = qobject_to(QDict, qlist_peek(qdict_get_qlist(resp, "return")));
    scans = qdict_get_int(info, "full-scans");
    qobject_unref(resp);

    qtest_qmp_assert_success(qts, "{ 'execute': 'mem-share-scan-now', "
                             "'arguments': { 'id': 'm0' } }");
    for (int tries = 0; tries < 600; tries++) {
        resp = qtest_qmp(qts, "{ 'execute': 'query-mem-share' }");
        info = qobject_to(QDict, qlist_peek(qdict_get_qlist(resp, "return")));
        if (!strcmp(qdict_get_str(info, "id"), "m0") &&
            qdict_get_int(info, "full-scans") > scans) {
            qobject_unref(resp);
            break;
        }
        qobject_unref(resp);
        g_assert_cmpint(tries, <, 599);
        g_usleep(50 * 1000);
    }

    resp = qtest_qmp(qts, "{ 'execute': 'mem-share-scan-now', "
                     "'arguments': { 'id': 'k0' } }");
    g_assert(strstr(qdict_get_str(qdict_get_qdict(resp, "error"), "desc"),
                    "needs mode=user"));
    qobject_unref(resp);
    resp = qtest_qmp(qts, "{ 'execute': 'mem-share-scan-now', "
                     "'arguments': { 'id': 'nosuch' } }");
    g_assert(strstr(qdict_get_str(qdict_get_qdict(resp, "error"), "desc"),
                    "'nosuch' is not a mem-share object"));
    qobject_unref(resp);
    qtest_quit(qts);
}

/* Sharing across QEMUs: a real mem-share-broker, three VMs, two groups */

#define G_PAGES         64
#define G_CONTENT(k)    (1000 + (k))

static const char *broker_binary(void)
{
    const char *bin = g_getenv("MS_BROKER");

    /* qtests run in build/qemu-build; make leaves the broker next to it */
    return bin ? bin : "../mem-share-broker";
}

static GPid start_broker(const char *sock)
{
    const char *argv[] = { broker_binary(), "--socket", sock, NULL };
    g_autoptr(GError) err = NULL;
    GPid pid;

    g_assert(g_spawn_async(NULL, (char **)argv, NULL,
                           G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, &pid,
                           &err));
    for (int tries = 0; !g_file_test(sock, G_FILE_TEST_EXISTS); tries++) {
        g_assert_cmpint(tries, <, 1000);
        g_usleep(10 * 1000);
    }
    return pid;
}

/* The broker runs as we do: that is the uid members must expect */
static QTestState *start_member(const char *group, const char *sock)
{
    return qtest_initf("-machine pc,memory-backend=m0 -m 128M -object "
                       "mem-share,id=m0,size=128M,mode=user,group=%s,"
                       "broker=%s,broker-uid=%u", group, sock,
                       (unsigned)geteuid());
}

static void write_group_pages(QTestState *qts, uint64_t base)
{
    g_autofree uint8_t *page = g_malloc(PAGE);

    for (int k = 0; k < G_PAGES; k++) {
        fill_content(page, G_CONTENT(k));
        qtest_memwrite(qts, base + (uint64_t)k * PAGE, page, PAGE);
    }
}

static void check_group_pages(QTestState *qts, uint64_t base, int except)
{
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autofree uint8_t *back = g_malloc(PAGE);

    for (int k = 0; k < G_PAGES; k++) {
        fill_content(page, k == except ? 7777 : G_CONTENT(k));
        qtest_memread(qts, base + (uint64_t)k * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
}

/* The "group" member of query-mem-share's "user" */
static QDict *group_info(QTestState *qts)
{
    QDict *info = query_one(qts);
    QDict *g = qdict_get_qdict(qdict_get_qdict(info, "user"), "group");

    g_assert(g);
    qobject_ref(g);
    qobject_unref(info);
    return g;
}

static uint64_t group_pages(QTestState *qts)
{
    QDict *g = group_info(qts);
    uint64_t pages = qdict_get_int(g, "pages");

    qobject_unref(g);
    return pages;
}

static bool group_info_connected(QTestState *qts)
{
    QDict *g = group_info(qts);
    bool connected = qdict_get_bool(g, "connected");

    qobject_unref(g);
    return connected;
}

static void scan_now(QTestState *qts)
{
    qtest_qmp_assert_success(qts, "{ 'execute': 'mem-share-scan-now', "
                             "'arguments': { 'id': 'm0' } }");
}

/* In the broker's child: become nobody */
static void become_nobody(gpointer data)
{
    if (setgroups(0, NULL) < 0 || setresgid(65534, 65534, 65534) < 0 ||
        setresuid(65534, 65534, 65534) < 0) {
        _exit(126);
    }
}

/*
 * QEMU sends nothing to a broker whose uid is neither broker-uid nor
 * root: the object is refused, with the listener's uid and what to set,
 * and the broker never hears of the group.  With broker-uid set to its
 * uid the VM joins.  As root the broker runs as nobody; otherwise as we
 * do, which the default (root) refuses as well.
 */
static void test_user_group_broker_uid(void)
{
    g_autofree char *dir = g_dir_make_tmp("mem-share-buid-XXXXXX", NULL);
    g_autofree char *sock = g_build_filename(dir, "broker.sock", NULL);
    uid_t uid = geteuid() == 0 ? 65534 : geteuid();
    const char *argv[] = { broker_binary(), "--socket", sock, NULL };
    const char *stats_argv[] = { broker_binary(), "--stats", "--socket",
                                 sock, NULL };
    g_autofree char *args = NULL, *out = NULL, *err = NULL;
    g_autofree char *stats = NULL, *runs_as = NULL;
    QTestState *qts;
    QDict *g;
    GPid broker;

    if (!g_file_test(broker_binary(), G_FILE_TEST_IS_EXECUTABLE)) {
        g_test_skip("mem-share-broker not built");
        return;
    }
    if (uid != geteuid()) {
        g_assert_cmpint(chown(dir, uid, uid), ==, 0);
    }
    g_assert(g_spawn_async(NULL, (char **)argv, NULL,
                           G_SPAWN_STDERR_TO_DEV_NULL,
                           uid != geteuid() ? become_nobody : NULL, NULL,
                           &broker, NULL));
    for (int tries = 0; !g_file_test(sock, G_FILE_TEST_EXISTS); tries++) {
        g_assert_cmpint(tries, <, 1000);
        g_usleep(10 * 1000);
    }

    args = g_strdup_printf("-object mem-share,id=m0,size=64M,mode=user,"
                           "group=g1,broker=%s", sock);
    g_assert_cmpint(run_qemu(args, &out, &err), ==, 1);
    runs_as = g_strdup_printf("runs as uid %u", (unsigned)uid);
    if (!strstr(err, "cannot join group 'g1' at broker") ||
        !strstr(err, "refusing the broker at") || !strstr(err, runs_as) ||
        !strstr(err, "must run as uid 0 (root)") ||
        !strstr(err, "set broker-uid to the user it runs as")) {
        g_error("unexpected refusal: %s", err);
    }
    g_assert(g_spawn_sync(NULL, (char **)stats_argv, NULL,
                          G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, &stats,
                          NULL, NULL, NULL));
    /* The refused member sent nothing: the broker has no group */
    if (!g_str_has_suffix(stats, "\nno groups\n")) {
        g_error("the broker's statistics list a group: %s", stats);
    }

    qts = qtest_initf("-machine pc,memory-backend=m0 -m 128M -object "
                      "mem-share,id=m0,size=128M,mode=user,group=g1,"
                      "broker=%s,broker-uid=%u", sock, (unsigned)uid);
    g = group_info(qts);
    g_assert(qdict_get_bool(g, "connected"));
    g_assert_cmpuint(qdict_get_int(g, "broker-uid"), ==, uid);
    qobject_unref(g);
    qtest_quit(qts);
    kill(broker, SIGTERM);
    waitpid(broker, NULL, 0);
    g_spawn_close_pid(broker);
    rmdir(dir);
}

/* A figure of one group from mem-share-broker --stats */
static uint64_t broker_figure(const char *sock, const char *group,
                              const char *name)
{
    const char *argv[] = { broker_binary(), "--stats", "--socket", sock,
                           NULL };
    g_autofree char *out = NULL;
    g_autofree char *head = g_strdup_printf("group %s\n", group);
    g_autofree char *key = g_strdup_printf("\n  %s ", name);
    const char *at;

    g_assert(g_spawn_sync(NULL, (char **)argv, NULL,
                          G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, &out, NULL,
                          NULL, NULL));
    at = strstr(out, head);
    g_assert(at);
    at = strstr(at, key);
    g_assert(at);
    return g_ascii_strtoull(at + strlen(key), NULL, 10);
}

static void test_user_group(void)
{
    g_autofree char *dir = g_dir_make_tmp("mem-share-group-XXXXXX", NULL);
    g_autofree char *sock = g_build_filename(dir, "broker.sock", NULL);
    QTestState *a, *b, *c, *d;
    QDict *g;
    GPid broker;

    if (!g_file_test(broker_binary(), G_FILE_TEST_IS_EXECUTABLE)) {
        g_test_skip("mem-share-broker not built");
        return;
    }
    broker = start_broker(sock);
    a = start_member("g1", sock);
    b = start_member("g1", sock);
    d = start_member("g1", sock);
    c = start_member("g2", sock);
    /* Each page once in each VM, at different places */
    write_group_pages(a, 40 * MiB);
    write_group_pages(b, 72 * MiB);
    write_group_pages(d, 88 * MiB);
    write_group_pages(c, 56 * MiB);
    for (int tries = 0; group_pages(a) < G_PAGES ||
                        group_pages(b) < G_PAGES ||
                        group_pages(d) < G_PAGES; tries++) {
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        scan_now(b);
        scan_now(d);
        scan_now(c);
        g_usleep(50 * 1000);
    }
    scan_now(c);
    /* g1's members share them; g2's one member shares with nobody */
    g_assert_cmpuint(broker_figure(sock, "g1", "clients"), ==, 3);
    g_assert_cmpuint(broker_figure(sock, "g1", "shared-slots"), >=, G_PAGES);
    g_assert_cmpuint(broker_figure(sock, "g2", "clients"), ==, 1);
    g_assert_cmpuint(broker_figure(sock, "g2", "shared-slots"), ==, 0);
    g_assert_cmpuint(group_pages(c), <, G_PAGES);
    check_group_pages(d, 88 * MiB, -1);
    qtest_quit(d);
    g = group_info(a);
    g_assert_cmpstr(qdict_get_str(g, "group"), ==, "g1");
    g_assert(qdict_get_bool(g, "connected"));
    g_assert_cmpuint(qdict_get_int(g, "hits") + qdict_get_int(g, "uploads"),
                     >=, G_PAGES);
    qobject_unref(g);
    check_group_pages(a, 40 * MiB, -1);
    check_group_pages(b, 72 * MiB, -1);
    check_group_pages(c, 56 * MiB, -1);

    /* A write breaks the writer's copy only */
    {
        g_autofree uint8_t *page = g_malloc(PAGE);

        fill_content(page, 7777);
        qtest_memwrite(a, 40 * MiB + 5 * PAGE, page, PAGE);
    }
    check_group_pages(a, 40 * MiB, 5);
    check_group_pages(b, 72 * MiB, -1);

    /* The broker dies: the VMs say so and keep their memory */
    kill(broker, SIGKILL);
    waitpid(broker, NULL, 0);
    g_spawn_close_pid(broker);
    for (int tries = 0; ; tries++) {
        g = group_info(a);
        if (!qdict_get_bool(g, "connected")) {
            qobject_unref(g);
            break;
        }
        qobject_unref(g);
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        g_usleep(50 * 1000);
    }
    check_group_pages(a, 40 * MiB, 5);
    check_group_pages(b, 72 * MiB, -1);

    /* A new broker: the members join again and share through it */
    unlink(sock);
    broker = start_broker(sock);
    for (int tries = 0; ; tries++) {
        g = group_info(a);
        if (qdict_get_bool(g, "connected")) {
            g_assert_cmpuint(qdict_get_int(g, "rejoins"), ==, 1);
            qobject_unref(g);
            break;
        }
        qobject_unref(g);
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        g_usleep(50 * 1000);
    }
    {
        uint64_t before = group_pages(a);
        g_autofree uint8_t *page = g_malloc(PAGE);

        for (int k = 0; k < 16; k++) {
            fill_content(page, 5000 + k);
            qtest_memwrite(a, 100 * MiB + k * PAGE, page, PAGE);
            qtest_memwrite(b, 110 * MiB + k * PAGE, page, PAGE);
        }
        for (int tries = 0; group_pages(a) < before + 16 ||
                            !group_info_connected(b); tries++) {
            g_assert_cmpint(tries, <, 600);
            scan_now(a);
            scan_now(b);
            g_usleep(50 * 1000);
        }
    }
    check_group_pages(a, 40 * MiB, 5);
    check_group_pages(b, 72 * MiB, -1);
    kill(broker, SIGKILL);
    waitpid(broker, NULL, 0);
    g_spawn_close_pid(broker);
    qtest_quit(a);
    qtest_quit(b);
    qtest_quit(c);
    unlink(sock);
    rmdir(dir);
}

/* Run a QMP command (must succeed); how long it took, in ms */
static int64_t G_GNUC_PRINTF(2, 3) timed_qmp(QTestState *qts,
                                             const char *fmt, ...)
{
    gint64 t0 = g_get_monotonic_time();
    g_autoptr(QDict) resp = NULL;
    va_list ap;

    va_start(ap, fmt);
    resp = qtest_vqmp(qts, fmt, ap);
    va_end(ap);
    g_assert(resp);
    g_assert(qdict_haskey(resp, "return"));
    return (g_get_monotonic_time() - t0) / 1000;
}

/*
 * The broker stops answering (SIGSTOP) for longer than every client
 * timeout while both members have work for it (pages to look up and
 * upload, group pages written: releases).  QMP commands that need the
 * scanner (mem-share-scan-now takes its lock) and a mode switch off and
 * back to user (a stop, an unmerge, a start) never wait for the broker;
 * the connection stays, the object counts the calls that gave up
 * waiting, and once the
 * broker runs again the pages meet and every page reads what was
 * written.
 */
static void test_user_group_stall(void)
{
    g_autofree char *dir = g_dir_make_tmp("mem-share-stall-XXXXXX", NULL);
    g_autofree char *sock = g_build_filename(dir, "broker.sock", NULL);
    g_autofree uint8_t *page = g_malloc(PAGE);
    int64_t worst = 0, worst_mode = 0;
    uint64_t waits = 0;
    QTestState *a, *b;
    uint64_t before;
    gint64 until;
    QDict *g;
    GPid broker;

    if (!g_file_test(broker_binary(), G_FILE_TEST_IS_EXECUTABLE)) {
        g_test_skip("mem-share-broker not built");
        return;
    }
    broker = start_broker(sock);
    a = start_member("g1", sock);
    b = start_member("g1", sock);
    write_group_pages(a, 40 * MiB);
    write_group_pages(b, 72 * MiB);
    for (int tries = 0; group_pages(a) < G_PAGES ||
                        group_pages(b) < G_PAGES; tries++) {
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        scan_now(b);
        g_usleep(50 * 1000);
    }
    before = group_pages(a);

    g_assert_cmpint(kill(broker, SIGSTOP), ==, 0);
    fill_content(page, 7777);
    qtest_memwrite(a, 40 * MiB + 5 * PAGE, page, PAGE);
    for (int k = 0; k < 16; k++) {
        fill_content(page, 6000 + k);
        qtest_memwrite(a, 100 * MiB + k * PAGE, page, PAGE);
        qtest_memwrite(b, 110 * MiB + k * PAGE, page, PAGE);
    }
    /* Past the client's 5 s timeout, asking all the time */
    until = g_get_monotonic_time() + 7 * G_USEC_PER_SEC;
    while (g_get_monotonic_time() < until) {
        for (int i = 0; i < 10; i++) {
            worst = MAX(worst, timed_qmp(a, "{ 'execute': "
                        "'mem-share-scan-now', 'arguments': "
                        "{ 'id': 'm0' } }"));
            worst = MAX(worst, timed_qmp(b, "{ 'execute': "
                        "'mem-share-scan-now', 'arguments': "
                        "{ 'id': 'm0' } }"));
            worst = MAX(worst, timed_qmp(a, "{ 'execute': "
                        "'query-mem-share' }"));
            g_usleep(20 * 1000);
        }
        g = group_info(b);
        waits = qdict_get_int(g, "waits");
        g_assert(qdict_get_bool(g, "connected"));
        qobject_unref(g);
    }
    worst_mode = MAX(timed_qmp(b, "{ 'execute': 'qom-set', 'arguments': "
                               "{ 'path': '/objects/m0', 'property': "
                               "'mode', 'value': 'off' } }"),
                     timed_qmp(b, "{ 'execute': 'qom-set', 'arguments': "
                               "{ 'path': '/objects/m0', 'property': "
                               "'mode', 'value': 'user' } }"));
    g_test_message("worst QMP answer %" PRId64 " ms, mode switch %" PRId64
                   " ms, while the broker was stopped", worst, worst_mode);
    g_assert_cmpint(worst, <, 100);
    /* A start and a stop, with an unmerge: never the broker's timeout */
    g_assert_cmpint(worst_mode, <, 2000);
    /* Gave up waiting (timed out, or let QMP in), connection kept */
    g_assert_cmpuint(waits, >, 0);
    check_group_pages(a, 40 * MiB, 5);
    check_group_pages(b, 72 * MiB, -1);

    g_assert_cmpint(kill(broker, SIGCONT), ==, 0);
    for (int tries = 0; group_pages(a) < before - 1 + 16; tries++) {
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        scan_now(b);
        g_usleep(50 * 1000);
    }
    g = group_info(a);
    g_assert(qdict_get_bool(g, "connected"));
    g_assert_cmpuint(qdict_get_int(g, "rejoins"), ==, 0);
    g_assert_cmpuint(qdict_get_int(g, "waits"), >, 0);
    qobject_unref(g);
    check_group_pages(a, 40 * MiB, 5);
    check_group_pages(b, 72 * MiB, -1);
    for (int k = 0; k < 16; k++) {
        g_autofree uint8_t *back = g_malloc(PAGE);

        fill_content(page, 6000 + k);
        qtest_memread(a, 100 * MiB + k * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
        qtest_memread(b, 110 * MiB + k * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
    kill(broker, SIGKILL);
    waitpid(broker, NULL, 0);
    g_spawn_close_pid(broker);
    qtest_quit(a);
    qtest_quit(b);
    unlink(sock);
    rmdir(dir);
}

static uint64_t zero_pages(QTestState *qts)
{
    QDict *info = query_one(qts);
    uint64_t n = qdict_get_int(info, "pages-zero");

    qobject_unref(info);
    return n;
}

/*
 * mode=user restarts in a group (off, then user: what a postcopy or
 * snapshot pause does too) after the broker gave the group's freed slots
 * other contents: the guest writes zeros and new contents into pages
 * that were merged with the group, the new scanner makes the zeros
 * holes, and every page reads what the guest wrote.  On 8af7614 the new
 * scanner took those pages for anonymous memory, and its zero merges
 * brought back what the broker had stored in the slot since.
 */
static void test_user_group_restart(void)
{
    g_autofree char *dir = g_dir_make_tmp("mem-share-restart-XXXXXX", NULL);
    g_autofree char *sock = g_build_filename(dir, "broker.sock", NULL);
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autofree uint8_t *back = g_malloc(PAGE);
    QTestState *a, *b;
    GPid broker;

    if (!g_file_test(broker_binary(), G_FILE_TEST_IS_EXECUTABLE)) {
        g_test_skip("mem-share-broker not built");
        return;
    }
    broker = start_broker(sock);
    a = start_member("g1", sock);
    b = start_member("g1", sock);
    write_group_pages(a, 40 * MiB);
    write_group_pages(b, 72 * MiB);
    for (int tries = 0; group_pages(a) < G_PAGES ||
                        group_pages(b) < G_PAGES; tries++) {
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        scan_now(b);
        g_usleep(50 * 1000);
    }
    /* Both stop: every slot is freed */
    qom_set_mode(a, "off");
    qom_set_mode(b, "off");
    check_group_pages(a, 40 * MiB, -1);
    /* b stores other pages, twice each: in the freed slots */
    qom_set_mode(b, "user");
    for (int k = 0; k < G_PAGES; k++) {
        fill_content(page, 9000 + k);
        qtest_memwrite(b, 20 * MiB + (uint64_t)k * PAGE, page, PAGE);
        qtest_memwrite(b, 24 * MiB + (uint64_t)k * PAGE, page, PAGE);
    }
    for (int tries = 0; group_pages(b) < 2 * G_PAGES; tries++) {
        g_assert_cmpint(tries, <, 600);
        scan_now(b);
        g_usleep(50 * 1000);
    }
    /* a runs again; its guest writes zeros and new bytes where it shared */
    qom_set_mode(a, "user");
    memset(page, 0, PAGE);
    for (int k = 0; k < G_PAGES / 2; k++) {
        qtest_memwrite(a, 40 * MiB + (uint64_t)k * PAGE, page, PAGE);
    }
    for (int k = G_PAGES / 2; k < G_PAGES; k++) {
        fill_content(page, 3000 + k);
        qtest_memwrite(a, 40 * MiB + (uint64_t)k * PAGE, page, PAGE);
    }
    for (int tries = 0; zero_pages(a) < G_PAGES / 2; tries++) {
        g_assert_cmpint(tries, <, 600);
        scan_now(a);
        g_usleep(50 * 1000);
    }
    check_zero(a, 40 * MiB, G_PAGES / 2);
    for (int k = G_PAGES / 2; k < G_PAGES; k++) {
        fill_content(page, 3000 + k);
        qtest_memread(a, 40 * MiB + (uint64_t)k * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
    for (int k = 0; k < G_PAGES; k++) {
        fill_content(page, 9000 + k);
        qtest_memread(b, 20 * MiB + (uint64_t)k * PAGE, back, PAGE);
        g_assert(memcmp(back, page, PAGE) == 0);
    }
    kill(broker, SIGKILL);
    waitpid(broker, NULL, 0);
    g_spawn_close_pid(broker);
    qtest_quit(a);
    qtest_quit(b);
    unlink(sock);
    rmdir(dir);
}

static char *set_background_snapshot(QTestState *qts, bool on)
{
    QDict *resp = qtest_qmp(qts, "{ 'execute': 'migrate-set-capabilities', "
                            "'arguments': { 'capabilities': [ { "
                            "'capability': 'background-snapshot', "
                            "'state': %i } ] } }", on);
    QDict *error = qdict_get_qdict(resp, "error");
    char *desc = error ? g_strdup(qdict_get_str(error, "desc")) : NULL;

    qobject_unref(resp);
    return desc;
}

static bool background_snapshot_set(QTestState *qts)
{
    QDict *resp = qtest_qmp(qts, "{ 'execute': "
                            "'query-migrate-capabilities' }");
    QListEntry *e;
    bool on = false;

    QLIST_FOREACH_ENTRY(qdict_get_qlist(resp, "return"), e) {
        QDict *cap = qobject_to(QDict, qlist_entry_obj(e));

        if (!strcmp(qdict_get_str(cap, "capability"),
                    "background-snapshot")) {
            on = qdict_get_bool(cap, "state");
        }
    }
    qobject_unref(resp);
    return on;
}

/* query-migrate's status once it is no longer setup or active */
static char *wait_migration_end(QTestState *qts)
{
    for (int tries = 0; tries < 1200; tries++) {
        QDict *resp = qtest_qmp(qts, "{ 'execute': 'query-migrate' }");
        QDict *ret = qdict_get_qdict(resp, "return");
        const char *status = qdict_haskey(ret, "status") ?
                             qdict_get_str(ret, "status") : "none";

        if (strcmp(status, "setup") && strcmp(status, "active") &&
            strcmp(status, "device")) {
            char *end = g_strdup(status);

            if (qdict_haskey(ret, "error-desc")) {
                g_test_message("migration %s: %s", status,
                               qdict_get_str(ret, "error-desc"));
            }
            qobject_unref(resp);
            return end;
        }
        qobject_unref(resp);
        g_usleep(50 * 1000);
    }
    g_error("the background snapshot did not end within 60 s");
}

/*
 * Background snapshot and mode=user both need the guest RAM's userfaultfd
 * write protection: mem-share lends it for the snapshot's duration, so
 * the capability's probe accepts RAM the scanner holds, without stopping
 * the scanner.  A snapshot stops the scanner while it runs; once it
 * completes, the VM runs on, mode=user starts again, merges again and
 * no merged page changed.
 */
static void test_user_background_snapshot(void)
{
    g_autofree char *snap = g_strdup_printf("%s/mem-share-snapshot-%d.bin",
                                            g_get_tmp_dir(), getpid());
    g_autofree char *uri = g_strdup_printf("exec:cat > %s", snap);
    g_autofree char *err1 = NULL;
    g_autofree char *err2 = NULL;
    g_autofree char *status = NULL;
    QTestState *qts = start_vm("off", NULL);
    uint64_t merged, scans;
    struct stat st;
    QDict *info, *resp;

    write_dups(qts, U_DUP_BASE, U_DUP_PAGES);
    qom_set_mode(qts, "user");
    qobject_unref(wait_user(qts, "pages-merged", U_DUP_PAGES));

    err1 = set_background_snapshot(qts, true);
    g_assert_null(err1);
    g_assert(background_snapshot_set(qts));
    info = query_one(qts);
    g_assert_cmpstr(qdict_get_str(info, "mode"), ==, "user");
    g_assert(qdict_haskey(info, "user"));
    qobject_unref(info);

    /* Take the snapshot of the running VM */
    unlink(snap);
    resp = qtest_qmp(qts, "{ 'execute': 'migrate', "
                     "'arguments': { 'uri': %s } }", uri);
    g_assert(qdict_haskey(resp, "return"));
    qobject_unref(resp);
    status = wait_migration_end(qts);
    g_assert_cmpstr(status, ==, "completed");
    g_assert_cmpint(stat(snap, &st), ==, 0);
    /* The RAM's non-zero pages are in it: one page per content at least */
    g_assert_cmpint(st.st_size, >, U_CONTENTS * PAGE);
    g_test_message("snapshot: %lld bytes", (long long)st.st_size);
    unlink(snap);

    resp = qtest_qmp(qts, "{ 'execute': 'query-status' }");
    g_assert_cmpstr(qdict_get_str(qdict_get_qdict(resp, "return"), "status"),
                    ==, "running");
    qobject_unref(resp);

    /*
     * mode=user runs again: its scanner completes full scans and merges
     * every duplicate again, and no byte of the guest changed
     */
    for (int tries = 0; ; tries++) {
        info = query_one(qts);
        if (qdict_haskey(info, "user")) {
            break;
        }
        qobject_unref(info);
        g_assert_cmpint(tries, <, 1200);
        g_usleep(50 * 1000);
    }
    g_assert_cmpstr(qdict_get_str(info, "mode"), ==, "user");
    scans = qdict_get_int(info, "full-scans");
    g_test_message("after the snapshot: full-scans %" PRIu64
                   ", pages-merged %" PRIu64, scans,
                   (uint64_t)qdict_get_int(info, "pages-merged"));
    qobject_unref(info);
    qobject_unref(wait_user(qts, "full-scans", scans + 2));
    info = wait_user(qts, "pages-merged", U_DUP_PAGES);
    merged = qdict_get_int(info, "pages-merged");
    g_assert_cmpuint(merged, >=, U_DUP_PAGES);
    qobject_unref(info);
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, -1);

    /* Switching modes with the capability set */
    qom_set_mode(qts, "off");
    qom_set_mode(qts, "user");
    info = query_one(qts);
    g_assert(qdict_haskey(info, "user"));
    qobject_unref(info);
    err2 = set_background_snapshot(qts, false);
    g_assert_null(err2);
    g_assert(!background_snapshot_set(qts));
    check_dups(qts, U_DUP_BASE, U_DUP_PAGES, -1);
    qtest_quit(qts);
}

/* ---- discards, pinning and hot-plug ---- */

/* The query-mem-share entry of @id, or NULL */
static QDict *query_id(QTestState *qts, const char *id)
{
    QDict *resp = qtest_qmp(qts, "{ 'execute': 'query-mem-share' }");
    QList *list = qdict_get_qlist(resp, "return");
    QDict *found = NULL;
    QListEntry *e;

    g_assert(list);
    QLIST_FOREACH_ENTRY(list, e) {
        QDict *info = qobject_to(QDict, qlist_entry_obj(e));

        if (!strcmp(qdict_get_str(info, "id"), id)) {
            found = info;
            qobject_ref(found);
        }
    }
    qobject_unref(resp);
    return found;
}

/* A figure of query-mem-share, top level or under "user" */
static uint64_t figure(QDict *info, const char *key)
{
    QDict *user = qdict_get_qdict(info, "user");

    if (qdict_haskey(info, key)) {
        return qdict_get_int(info, key);
    }
    g_assert(user);
    return qdict_get_int(user, key);
}

/* Wait until @key of @id compares to @value as @below says */
static void wait_figure(QTestState *qts, const char *id, const char *key,
                        bool below, uint64_t value)
{
    for (int tries = 0; tries < 1200; tries++) {
        g_autoptr(QDict) info = query_id(qts, id);
        uint64_t v;

        g_assert(info);
        v = figure(info, key);
        if (below ? v <= value : v >= value) {
            return;
        }
        g_usleep(50 * 1000);
    }
    g_error("%s of %s never got %s %" PRIu64, key, id, below ? "<=" : ">=",
            value);
}

/* The "data" of the first memory device of query-memory-devices */
static QDict *memory_device(QTestState *qts)
{
    QDict *resp = qtest_qmp(qts, "{ 'execute': 'query-memory-devices' }");
    QList *list = qdict_get_qlist(resp, "return");
    QDict *data;

    g_assert(list && qlist_size(list) == 1);
    data = qdict_get_qdict(qobject_to(QDict, qlist_peek(list)), "data");
    qobject_ref(data);
    qobject_unref(resp);
    return data;
}

#define VIRTIO_PCI_VENDOR_ID        0x1af4           /* Red Hat/Qumranet */
#define VIRTIO_MEM_PCI_DEVICE_ID    (0x1040 + 24)    /* VIRTIO_ID_MEM */
#define VIRTIO_MEM_TIMEOUT_US       (10 * G_USEC_PER_SEC)

static void find_virtio_mem(QPCIDevice *dev, int devfn, void *data)
{
    *(int *)data = devfn;
    g_free(dev);
}

/*
 * Plug @nb_blocks blocks at @addr of the only virtio-mem-pci device, the
 * way the guest's driver would (the device discards at reset only what
 * is plugged).  Returns the device's answer, VIRTIO_MEM_RESP_*.
 */
static uint16_t virtio_mem_plug(QTestState *qts, uint64_t addr,
                                uint16_t nb_blocks)
{
    const uint64_t features = (1ULL << VIRTIO_F_VERSION_1) |
                              (1ULL << VIRTIO_MEM_F_ACPI_PXM) |
                              (1ULL << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE) |
                              (1ULL << VIRTIO_MEM_F_PERSISTENT_SUSPEND);
    struct virtio_mem_req req = {
        .type = cpu_to_le16(VIRTIO_MEM_REQ_PLUG),
        .u.plug.addr = cpu_to_le64(addr),
        .u.plug.nb_blocks = cpu_to_le16(nb_blocks),
    };
    QVirtioPCIDevice *vpci;
    QPCIAddress pci_addr;
    QGuestAllocator alloc;
    QVirtQueue *vq;
    QPCIBus *bus;
    uint64_t req_addr, resp_addr;
    uint32_t head;
    uint16_t resp;
    int devfn = -1;

    pc_alloc_init(&alloc, qts, ALLOC_NO_FLAGS);
    bus = qpci_new_pc(qts, &alloc);
    qpci_device_foreach(bus, VIRTIO_PCI_VENDOR_ID,
                        VIRTIO_MEM_PCI_DEVICE_ID, find_virtio_mem, &devfn);
    g_assert_cmpint(devfn, >=, 0);
    pci_addr.devfn = devfn;
    vpci = virtio_pci_new(bus, &pci_addr);
    g_assert(vpci);
    qvirtio_pci_device_enable(vpci);
    qvirtio_start_device(&vpci->vdev);
    qvirtio_set_features(&vpci->vdev,
                         qvirtio_get_features(&vpci->vdev) & features);
    vq = qvirtqueue_setup(&vpci->vdev, &alloc, 0);
    qvirtio_set_driver_ok(&vpci->vdev);

    req_addr = guest_alloc(&alloc, sizeof(req));
    resp_addr = guest_alloc(&alloc, sizeof(struct virtio_mem_resp));
    qtest_memwrite(qts, req_addr, &req, sizeof(req));
    head = qvirtqueue_add(qts, vq, req_addr, sizeof(req), false, true);
    qvirtqueue_add(qts, vq, resp_addr, sizeof(struct virtio_mem_resp), true,
                   false);
    qvirtqueue_kick(qts, &vpci->vdev, vq, head);
    qvirtio_wait_used_elem(qts, &vpci->vdev, vq, head, NULL,
                           VIRTIO_MEM_TIMEOUT_US);
    resp = le16_to_cpu(qtest_readw(qts, resp_addr));

    guest_free(&alloc, req_addr);
    guest_free(&alloc, resp_addr);
    qvirtqueue_cleanup(vpci->vdev.bus, vq, &alloc);
    qvirtio_pci_device_disable(vpci);
    g_free(vpci);
    qpci_free_pc(bus);
    alloc_destroy(&alloc);
    return resp;
}

/*
 * Lines of /proc/PID/maps (PID from @pidfile) that contain @what; with
 * @private, only private mappings: guest pages that map the store, not
 * the scanner's own shared view of it.
 */
static int maps_count(const char *pidfile, const char *what, bool private)
{
    g_autofree char *maps = proc_file(pidfile, "maps");
    g_auto(GStrv) lines = g_strsplit(maps, "\n", -1);
    int n = 0;

    for (char **l = lines; *l; l++) {
        char perms[8];

        if (strstr(*l, what) && sscanf(*l, "%*x-%*x %7s", perms) == 1) {
            n += !private || perms[3] == 'p';
        }
    }
    return n;
}

#define D_PAGES         256
#define D_ZERO_PAGES    64

#define NVME_ADD "{ 'execute': 'blockdev-add', 'arguments': { " \
                 "'driver': 'nvme', 'node-name': 'nvme0', " \
                 "'device': '0000:00:04.0', 'namespace': 1 } }"

/*
 * mode=user requires discards: VFIO's userspace driver (block/nvme.c),
 * which pins all guest RAM, is refused with a message that names
 * mem-share; without mode=user the same driver gets as far as looking
 * for the device (which is not there).
 */
static void test_user_pinning(void)
{
    QTestState *qts = start_vm("user", NULL);
    QDict *resp, *info;
    const char *desc;

    resp = qtest_qmp(qts, NVME_ADD);
    desc = qdict_get_str(qdict_get_qdict(resp, "error"), "desc");
    g_test_message("mode=user: %s", desc);
    if (strstr(desc, "nvme") && !strstr(desc, "discarding")) {
        g_test_skip("this QEMU has no usable nvme block driver");
        qobject_unref(resp);
        qtest_quit(qts);
        return;
    }
    g_assert(strstr(desc, "Cannot set discarding of RAM broken"));
    g_assert(strstr(desc, "mem-share backend in mode=user"));
    qobject_unref(resp);
    info = query_one(qts);
    g_assert_cmpstr(qdict_get_str(info, "mode"), ==, "user");
    qobject_unref(info);

    qom_set_mode(qts, "off");
    resp = qtest_qmp(qts, NVME_ADD);
    desc = qdict_get_str(qdict_get_qdict(resp, "error"), "desc");
    g_test_message("mode=off: %s", desc);
    g_assert(!strstr(desc, "discarding"));
    qobject_unref(resp);

    /* Nothing pins the RAM: mode=user can start again */
    qom_set_mode(qts, "user");
    info = query_one(qts);
    g_assert(qdict_haskey(info, "user"));
    qobject_unref(info);
    qtest_quit(qts);
}

/*
 * virtio-mem on a mode=user backend (refused before discards went
 * through the engine): a system reset unplugs all of it, with one
 * ram_block_discard_range() over the whole memdev.  Merged pages must
 * read zeros afterwards and give their store references back; plain
 * MADV_DONTNEED would bring the store's content back.
 */
static void test_user_virtio_mem(void)
{
    g_autofree char *pidfile = g_strdup_printf("%s/mem-share-vmem-%d.pid",
                                               g_get_tmp_dir(), getpid());
    g_autofree uint8_t *page = g_malloc(PAGE);
    g_autoptr(QDict) dev = NULL;
    g_autoptr(QDict) after = NULL;
    QTestState *qts;
    uint64_t base;

    if (!qtest_has_device("virtio-mem-pci")) {
        g_test_skip("no virtio-mem-pci in this QEMU");
        return;
    }
    qts = qtest_initf("-machine pc,memory-backend=m0 -m 128M,maxmem=1G "
                      "-object mem-share,id=m0,size=128M,mode=off "
                      "-object mem-share,id=vm0,size=64M,mode=user "
                      "-device virtio-mem-pci,id=vmem0,memdev=vm0,"
                      "block-size=2M,requested-size=2M -pidfile %s", pidfile);
    dev = memory_device(qts);
    base = qdict_get_int(dev, "memaddr");
    /* The reset discards all of the memory if some of it is plugged */
    g_assert_cmpuint(virtio_mem_plug(qts, base, 1), ==, VIRTIO_MEM_RESP_ACK);

    /* Duplicates and zero pages, merged */
    write_dups(qts, base, D_PAGES);
    qtest_memset(qts, base + D_PAGES * PAGE, 0, D_ZERO_PAGES * PAGE);
    wait_figure(qts, "vm0", "pages-shared", false, D_PAGES);
    wait_figure(qts, "vm0", "pages-zero", false, D_ZERO_PAGES);
    g_assert_cmpint(maps_count(pidfile, "mem-share-store", true), >, 0);
    /* One merged page written since: its copy still maps the store */
    memset(page, 0x5a, PAGE);
    qtest_memwrite(qts, base + 3 * PAGE, page, PAGE);

    qtest_qmp_assert_success(qts, "{ 'execute': 'system_reset' }");
    qtest_qmp_eventwait(qts, "RESET");
    wait_figure(qts, "vm0", "pages-merged", true, 0);
    after = query_id(qts, "vm0");
    g_assert_cmpuint(figure(after, "pages-shared"), ==, 0);
    g_assert_cmpuint(figure(after, "store-pages"), ==, 0);
    g_assert_cmpuint(figure(after, "pages-zero"), ==, 0);
    check_zero(qts, base, D_PAGES + D_ZERO_PAGES);
    /* The unplugged pages map anonymous memory again, not the store */
    g_assert_cmpint(maps_count(pidfile, "mem-share-store", true), ==, 0);

    /* Still a working backend: what is written there merges again */
    write_dups(qts, base, D_PAGES);
    wait_figure(qts, "vm0", "pages-shared", false, D_PAGES);
    check_dups(qts, base, D_PAGES, -1);
    qtest_quit(qts);
    unlink(pidfile);
}

/* Pages of @id on its group's store */
static uint64_t id_group_pages(QTestState *qts, const char *id)
{
    g_autoptr(QDict) info = query_id(qts, id);
    QDict *g = qdict_get_qdict(qdict_get_qdict(info, "user"), "group");

    g_assert(g);
    return qdict_get_int(g, "pages");
}

/*
 * After mode=user stopped, unmerged pages are private copies inside
 * mappings of the group's store.  A later discard (here virtio-mem's
 * unplug at reset, in mode=off) must leave zeros, not the content that
 * the group's slot holds for the other member.
 */
static void test_user_discard_after_group(void)
{
    g_autofree char *dir = g_dir_make_tmp("mem-share-dgroup-XXXXXX", NULL);
    g_autofree char *sock = g_build_filename(dir, "broker.sock", NULL);
    g_autoptr(QDict) dev = NULL;
    QTestState *a, *b;
    uint64_t base;
    GPid broker;

    if (!g_file_test(broker_binary(), G_FILE_TEST_IS_EXECUTABLE) ||
        !qtest_has_device("virtio-mem-pci")) {
        g_test_skip("mem-share-broker or virtio-mem-pci not built");
        return;
    }
    broker = start_broker(sock);
    b = start_member("g1", sock);
    a = qtest_initf("-machine pc,memory-backend=m0 -m 128M,maxmem=1G "
                    "-object mem-share,id=m0,size=128M,mode=off "
                    "-object mem-share,id=vm0,size=64M,mode=user,group=g1,"
                    "broker=%s,broker-uid=%u -device virtio-mem-pci,"
                    "id=vmem0,memdev=vm0,block-size=2M,requested-size=2M",
                    sock, (unsigned)geteuid());
    dev = memory_device(a);
    base = qdict_get_int(dev, "memaddr");
    /* As in test_user_virtio_mem(): the reset discards if some is plugged */
    g_assert_cmpuint(virtio_mem_plug(a, base, 1), ==, VIRTIO_MEM_RESP_ACK);
    write_group_pages(b, 40 * MiB);
    write_group_pages(a, base);
    for (int tries = 0; id_group_pages(a, "vm0") < G_PAGES ||
                        group_pages(b) < G_PAGES; tries++) {
        g_assert_cmpint(tries, <, 600);
        qtest_qmp_assert_success(a, "{ 'execute': 'mem-share-scan-now', "
                                 "'arguments': { 'id': 'vm0' } }");
        scan_now(b);
        g_usleep(50 * 1000);
    }

    /* Unmerged: private copies, the group's slots still b's */
    qtest_qmp_assert_success(a, "{ 'execute': 'qom-set', 'arguments': "
                             "{ 'path': '/objects/vm0', 'property': 'mode',"
                             " 'value': 'off' } }");
    check_group_pages(a, base, -1);
    g_assert_cmpuint(group_pages(b), ==, G_PAGES);

    /* Discarded: zeros, not b's pages */
    qtest_qmp_assert_success(a, "{ 'execute': 'system_reset' }");
    qtest_qmp_eventwait(a, "RESET");
    check_zero(a, base, G_PAGES);
    check_group_pages(b, 40 * MiB, -1);

    qtest_quit(a);
    qtest_quit(b);
    kill(broker, SIGTERM);
    waitpid(broker, NULL, 0);
    unlink(sock);
    rmdir(dir);
}

/*
 * A pc-dimm on a mode=user backend, plugged at run time: its RAM is
 * scanned and merged; once unplugged (the guest's ACPI eject, done here
 * through the memory hot-plug registers) the object can be deleted, and
 * its scanner and store go with it.
 */
static void test_user_pc_dimm(void)
{
    g_autofree char *pidfile = g_strdup_printf("%s/mem-share-dimm-%d.pid",
                                               g_get_tmp_dir(), getpid());
    g_autoptr(QDict) dev = NULL;
    QTestState *qts;
    uint64_t base;
    int tries;

    qts = qtest_initf("-machine pc,memory-backend=m0 -m 128M,slots=2,"
                      "maxmem=1G -object mem-share,id=m0,size=128M,mode=off "
                      "-pidfile %s", pidfile);
    qtest_qmp_assert_success(qts, "{ 'execute': 'object-add', 'arguments': "
                             "{ 'qom-type': 'mem-share', 'id': 'd1', "
                             "'size': %" PRIu64 ", 'mode': 'user' } }",
                             (uint64_t)64 * MiB);
    qtest_qmp_assert_success(qts, "{ 'execute': 'device_add', 'arguments': "
                             "{ 'driver': 'pc-dimm', 'id': 'dimm1', "
                             "'memdev': 'd1' } }");
    dev = memory_device(qts);
    base = qdict_get_int(dev, "addr");
    g_assert_cmpint(qdict_get_int(dev, "slot"), ==, 0);

    write_dups(qts, base, D_PAGES);
    wait_figure(qts, "d1", "pages-shared", false, D_PAGES);
    wait_figure(qts, "d1", "full-scans", false, 2);
    check_dups(qts, base, D_PAGES, -1);
    g_assert_cmpint(maps_count(pidfile, "mem-share-store", true), >, 0);

    /* Unplug: the request, then the guest's eject of slot 0 */
    qtest_qmp_assert_success(qts, "{ 'execute': 'device_del', 'arguments': "
                             "{ 'id': 'dimm1' } }");
    qtest_outl(qts, 0xa00, 0);          /* slot selector */
    qtest_outl(qts, 0xa00 + 0x14, 8);   /* eject */
    qtest_qmp_eventwait(qts, "DEVICE_DELETED");
    qtest_qmp_assert_success(qts, "{ 'execute': 'object-del', 'arguments': "
                             "{ 'id': 'd1' } }");
    g_assert_null(query_id(qts, "d1"));
    /* The RAM is freed after an RCU grace period, the store with it */
    for (tries = 0; tries < 600; tries++) {
        if (!maps_count(pidfile, "mem-share-store", false)) {
            break;
        }
        g_usleep(50 * 1000);
    }
    g_assert_cmpint(maps_count(pidfile, "mem-share-store", false), ==, 0);
    qtest_quit(qts);
    unlink(pidfile);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);

    qtest_add_func("/mem-share/help", test_help);
    qtest_add_func("/mem-share/errors/cmdline", test_cmdline_errors);
    qtest_add_func("/mem-share/errors/qmp", test_qmp_errors);
    qtest_add_func("/mem-share/query/off", test_query_off);
    qtest_add_func("/mem-share/query/kernel", test_query_kernel);
    qtest_add_func("/mem-share/mergeable-flag", test_mergeable_flag);
    add_uffd_test("/mem-share/runtime-modes", test_runtime_modes);
    qtest_add_func("/mem-share/numa-memdev", test_numa_memdev);
    qtest_add_func("/mem-share/query-stats", test_query_stats);
    qtest_add_func("/mem-share/hmp", test_hmp);
    qtest_add_func("/mem-share/ksm-merge", test_ksm_merge);
    add_uffd_test("/mem-share/user/merge", test_user_merge);
    add_uffd_test("/mem-share/user/scan-now", test_user_scan_now);
    add_uffd_test("/mem-share/user/dirty-log", test_user_dirty_log);
    add_uffd_test("/mem-share/user/pacing", test_user_pacing);
    add_uffd_test("/mem-share/user/huge-fill", test_user_huge_fill);
    add_uffd_test("/mem-share/user/group", test_user_group);
    add_uffd_test("/mem-share/user/group-stall", test_user_group_stall);
    add_uffd_test("/mem-share/user/group-restart", test_user_group_restart);
    add_uffd_test("/mem-share/user/group-broker-uid",
                  test_user_group_broker_uid);
    add_uffd_test("/mem-share/user/background-snapshot",
                  test_user_background_snapshot);
    add_uffd_test("/mem-share/user/pinning", test_user_pinning);
    add_uffd_test("/mem-share/user/virtio-mem", test_user_virtio_mem);
    add_uffd_test("/mem-share/user/discard-after-group",
                  test_user_discard_after_group);
    add_uffd_test("/mem-share/user/pc-dimm", test_user_pc_dimm);

    return g_test_run();
}
