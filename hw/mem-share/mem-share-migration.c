/*
 * mem-share: migration
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Precopy needs nothing: the source reads guest RAM (merged pages and
 * holes read their content), and on the destination the incoming
 * migration writes RAM like a vCPU would, so a write into a page being
 * merged sleeps on the freeze and then takes its private copy.
 *
 * Postcopy, on the destination: at ADVISE QEMU discards all of the RAM,
 * later it discards again every page the source dirtied after sending it,
 * both with MADV_DONTNEED, which on a merged page brings back the store's
 * content instead of zeros (the page would then never be requested from
 * the source: silent corruption); and when postcopy starts listening it
 * registers the RAM with its own userfaultfd, which fails (EBUSY) while
 * the scanner holds it.  So at ADVISE, before any of that and while the
 * RAM holds nothing yet, every mode=user object stops its scanner and
 * unmerges (mem_share_user_stop()), and starts again once the incoming
 * migration is over: when the postcopy listen thread ended (it released
 * the RAM), or when the VM starts after a migration that completed in
 * precopy.
 *
 * Background snapshot, on the source: write tracking registers the RAM
 * with a userfaultfd of its own for the whole snapshot.  The capability
 * probe asks whether mem-share will release the RAM it holds (yes), and
 * before the snapshot populates and write-protects the RAM, every
 * mode=user object stops its scanner and unmerges; they start again when
 * the migration state notifiers report the end of the snapshot.  While a
 * snapshot runs, mode=user refuses to start.
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/notify.h"
#include "qemu/timer.h"
#include "qapi/error.h"
#include "qom/object.h"
#include "system/runstate.h"
#include "migration/misc.h"
#include "migration/postcopy-ram.h"
#include "hw/mem-share/mem-share.h"
#include "trace.h"

/* How often to look whether the postcopy listen thread has ended */
#define MEM_SHARE_RESUME_POLL_MS 10

/* Why objects are paused: a destination's postcopy, a source's snapshot */
static bool mem_share_paused_postcopy;
static bool mem_share_paused_snapshot;

static NotifierWithReturn mem_share_postcopy_notifier;
static VMChangeStateEntry *mem_share_vm_change;
static QEMUTimer *mem_share_resume_timer;

typedef struct MemSharePause {
    const char *why;
    Error **errp;
} MemSharePause;

static int mem_share_pause_one(Object *obj, void *opaque)
{
    MemShareBackend *ms = (MemShareBackend *)
                          object_dynamic_cast(obj, TYPE_MEM_SHARE);
    MemSharePause *p = opaque;
    Error **errp = p->errp;
    const char *id;

    if (!ms || !ms->user) {
        return 0;
    }
    id = object_get_canonical_path_component(obj);
    if (!mem_share_user_stop(ms, true, errp)) {
        error_prepend(errp, "mem-share '%s' cannot give its RAM to %s: ",
                      id, p->why);
        return -1;
    }
    ms->migration_paused = true;
    trace_mem_share_migration_pause(id, p->why);
    return 0;
}

static int mem_share_resume_one(Object *obj, void *opaque)
{
    MemShareBackend *ms = (MemShareBackend *)
                          object_dynamic_cast(obj, TYPE_MEM_SHARE);
    Error *err = NULL;

    if (!ms || !ms->migration_paused) {
        return 0;
    }
    ms->migration_paused = false;
    /* The operator may have left mode=user meanwhile */
    if (ms->mode != MEM_SHARE_MODE_USER || ms->user) {
        return 0;
    }
    trace_mem_share_migration_resume(object_get_canonical_path_component(obj));
    if (!mem_share_user_start(ms, &err)) {
        error_prepend(&err, "mem-share '%s': mode=user cannot resume after"
                      " the migration: ",
                      object_get_canonical_path_component(obj));
        warn_report_err(err);
    }
    return 0;
}

static void mem_share_migration_resume(void)
{
    mem_share_paused_postcopy = false;
    mem_share_paused_snapshot = false;
    object_child_foreach(object_get_objects_root(), mem_share_resume_one,
                         NULL);
}

/* Main loop: resume once the postcopy listen thread released the RAM */
static void mem_share_resume_timer_cb(void *opaque)
{
    if (postcopy_state_get() != POSTCOPY_INCOMING_END) {
        timer_mod(mem_share_resume_timer,
                  qemu_clock_get_ms(QEMU_CLOCK_REALTIME) +
                  MEM_SHARE_RESUME_POLL_MS);
        return;
    }
    mem_share_migration_resume();
}

static int mem_share_pause(const char *why, Error **errp)
{
    MemSharePause p = { .why = why, .errp = errp };

    return object_child_foreach(object_get_objects_root(),
                                mem_share_pause_one, &p);
}

static int mem_share_postcopy_notify(NotifierWithReturn *n, void *data,
                                     Error **errp)
{
    struct PostcopyNotifyData *pnd = data;

    switch (pnd->reason) {
    case POSTCOPY_NOTIFY_INBOUND_ADVISE:
        /* The incoming coroutine, with the BQL */
        mem_share_paused_postcopy = true;
        return mem_share_pause("postcopy", errp);
    case POSTCOPY_NOTIFY_INBOUND_END:
        /*
         * The listen thread, without the BQL, before it unregisters the
         * RAM from its userfaultfd: resume from the main loop once it is
         * done (timer_mod() is thread-safe).
         */
        timer_mod(mem_share_resume_timer,
                  qemu_clock_get_ms(QEMU_CLOCK_REALTIME));
        return 0;
    default:
        return 0;
    }
}

/*
 * A migration that advised postcopy but completed in precopy: no listen
 * thread, the RAM is ours again when the VM starts.  When postcopy runs,
 * the VM starts while pages still arrive: the timer resumes later.
 */
static void mem_share_vm_state_change(void *opaque, bool running,
                                      RunState state)
{
    PostcopyState ps = postcopy_state_get();

    if (running && mem_share_paused_postcopy &&
        ps != POSTCOPY_INCOMING_LISTENING &&
        ps != POSTCOPY_INCOMING_RUNNING) {
        mem_share_migration_resume();
    }
}

static int mem_share_write_tracking_notify(NotifierWithReturn *n,
                                           void *data, Error **errp)
{
    WriteTrackingNotifyData *wtd = data;
    MemShareBackend *ms;
    bool locked;
    int ret;

    switch (wtd->reason) {
    case WRITE_TRACKING_NOTIFY_PROBE:
        /* A RAM block our scanner holds: released when the snapshot starts */
        ms = (MemShareBackend *)
             object_dynamic_cast(memory_region_owner(wtd->mr),
                                 TYPE_MEM_SHARE);
        return ms && ms->user ? 1 : 0;
    case WRITE_TRACKING_NOTIFY_RELEASE:
        /* The migration thread, before the RAM is populated and protected */
        locked = bql_locked();
        if (!locked) {
            bql_lock();
        }
        mem_share_paused_snapshot = true;
        ret = mem_share_pause("a background snapshot", errp);
        if (!locked) {
            bql_unlock();
        }
        return ret;
    default:
        return 0;
    }
}

/* Main loop: the end of an outgoing migration (a background snapshot) */
static int mem_share_migration_event(NotifierWithReturn *n,
                                     MigrationEvent *e, Error **errp)
{
    if (mem_share_paused_snapshot &&
        (e->type == MIG_EVENT_PRECOPY_DONE ||
         e->type == MIG_EVENT_PRECOPY_FAILED)) {
        mem_share_migration_resume();
    }
    return 0;
}

static NotifierWithReturn mem_share_write_tracking_notifier;
static NotifierWithReturn mem_share_migration_notifier;

void mem_share_migration_register(void)
{
    if (mem_share_resume_timer) {
        return;
    }
    mem_share_resume_timer = timer_new_ms(QEMU_CLOCK_REALTIME,
                                          mem_share_resume_timer_cb, NULL);
    mem_share_postcopy_notifier.notify = mem_share_postcopy_notify;
    postcopy_add_notifier(&mem_share_postcopy_notifier);
    mem_share_write_tracking_notifier.notify = mem_share_write_tracking_notify;
    ram_write_tracking_add_notifier(&mem_share_write_tracking_notifier);
    migration_add_notifier(&mem_share_migration_notifier,
                           mem_share_migration_event);
    mem_share_vm_change =
        qemu_add_vm_change_state_handler(mem_share_vm_state_change, NULL);
}

bool mem_share_migration_check_user(MemShareBackend *ms, Error **errp)
{
    /*
     * Objects of the command line are created before the migration
     * object, when no migration can run yet: migration_is_running()
     * does not need it, and comes first.
     */
    if (migration_is_running() && migration_in_bg_snapshot()) {
        error_setg(errp, "mode=user cannot start while a background snapshot"
                   " write-protects the guest RAM; it can once the snapshot"
                   " ended");
        return false;
    }
    return true;
}
