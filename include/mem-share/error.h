/*
 * mem-share engine: the error domain
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Every engine function that can fail returns bool and sets a GError in
 * this domain; the error code is an errno value.
 */

#ifndef MEM_SHARE_ERROR_H
#define MEM_SHARE_ERROR_H

#include <glib.h>

#define MS_ENGINE_ERROR ms_engine_error_quark()
GQuark ms_engine_error_quark(void);

/*
 * For the one kind of failure the engine must not report and carry on
 * from: guest memory it can no longer restore (a hole where guest RAM
 * was).  Prints "mem-share: " and the message on stderr, then abort()s:
 * stopping the process with the reason beats letting the guest run on
 * over memory that is gone.
 */
void ms_fatal(const char *fmt, ...)
    __attribute__((noreturn)) G_GNUC_PRINTF(1, 2);

#endif /* MEM_SHARE_ERROR_H */
