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

#endif /* MEM_SHARE_ERROR_H */
