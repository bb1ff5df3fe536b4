/*
 * mem-share: the guest RAM that zero-copy I/O is transferring into
 *
 * Copyright (c) 2026 The mem-share authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Devices emulated with zero-copy I/O map guest RAM with
 * address_space_map() and let the host kernel transfer into it directly:
 * virtio-blk or NVMe with cache=none (O_DIRECT preadv, io_uring,
 * linux-aio) pin the pages when the request is submitted and write them
 * when it completes.  Write-protecting a page does not stop such a
 * transfer: had mode=user merged the page meanwhile, mapping the store
 * over it, the transfer would land in the orphaned old page and the
 * guest would never see it.
 *
 * So every mem-share object counts, per page of its RAM, the direct
 * mappings that cover it: patch 0011 has address_space_map() and
 * address_space_unmap() call a hook on the object's RAM block, which
 * raises and lowers the counts here.  The engine reads them with atomic
 * loads (MsScanConfig.dma_pins) and skips pages with a count; see "DMA"
 * in merge.c for why a full barrier on each side is enough:
 *
 *   mapper (here):  count++; full barrier; return the pointer, and the
 *                   caller submits the transfer (the kernel pins)
 *   merge (engine): freeze; full barrier; read the count; compare ...
 *
 * The counts are kept in every mode, from the allocation of the RAM on,
 * so that they are right whenever mode=user starts: a mapping taken
 * before it must not be missed, nor its unmapping lower a count below
 * zero.  The cost, one atomic operation per page mapped and unmapped,
 * falls on mem-share's RAM only; other RAM blocks have no hook.
 * Memory: 4 bytes per page (0.1%).
 *
 * A caller that unmaps a different length than it mapped would leave
 * the counts wrong: too high only stops merges of its pages, too low is
 * caught here (a count never goes below zero) and reported by a trace.
 */

#include "qemu/osdep.h"
#include "qemu/atomic.h"
#include "exec/memory.h"
#include "exec/ramblock.h"
#include "hw/mem-share/mem-share.h"
#include "trace.h"

/* Raise the counts of [@first, @last], then the mapper's barrier */
static void mem_share_dma_pin(uint32_t *pins, size_t first, size_t last)
{
    for (size_t i = first; i <= last; i++) {
        qatomic_inc(&pins[i]);
    }
    /*
     * Before the caller submits the transfer, i.e. before the kernel
     * pins the pages: a merge that reads a count of zero after its
     * freeze makes that pin wait for the merge (see merge.c, "DMA").
     */
    smp_mb();
}

/* Lower the counts of [@first, @last], never below zero */
static bool mem_share_dma_unpin(uint32_t *pins, size_t first, size_t last)
{
    bool balanced = true;

    /*
     * The transfer has completed: its data is in the pages before the
     * count drops, so a merge that reads zero compares the data.
     */
    for (size_t i = first; i <= last; i++) {
        uint32_t old = qatomic_read(&pins[i]);

        for (;;) {
            uint32_t seen;

            if (!old) {
                balanced = false;
                break;
            }
            seen = qatomic_cmpxchg(&pins[i], old, old - 1);
            if (seen == old) {
                break;
            }
            old = seen;
        }
    }
    return balanced;
}

/* RAMBlockDMANotify of the object's RAM block; any thread, any lock */
static void mem_share_dma_notify(RAMBlock *rb, ram_addr_t offset,
                                 ram_addr_t length, bool map, void *opaque)
{
    MemShareBackend *ms = opaque;
    size_t first, last;
    bool balanced = true;

    if (!length || offset >= ms->dma_npages * ms->dma_page_size) {
        return;
    }
    first = offset / ms->dma_page_size;
    last = MIN((offset + length - 1) / ms->dma_page_size,
               ms->dma_npages - 1);
    if (map) {
        mem_share_dma_pin(ms->dma_pins, first, last);
    } else {
        balanced = mem_share_dma_unpin(ms->dma_pins, first, last);
    }
    trace_mem_share_dma_notify(qemu_ram_get_idstr(rb), offset, length, map,
                               balanced);
}

void mem_share_dma_init(MemShareBackend *ms)
{
    HostMemoryBackend *backend = MEMORY_BACKEND(ms);
    RAMBlock *rb = backend->mr.ram_block;

    ms->dma_page_size = qemu_real_host_page_size();
    ms->dma_npages = backend->size / ms->dma_page_size;
    ms->dma_pins = g_new0(uint32_t, ms->dma_npages);
    /* Before any device can map the RAM: the machine is not built yet */
    qemu_ram_set_dma_notify(rb, mem_share_dma_notify, ms);
}

void mem_share_dma_cleanup(MemShareBackend *ms)
{
    /*
     * Every mapping holds a reference on the RAM's owner, us: none is
     * left when the object goes away.  The RAM block, a child, is gone
     * already, and its hook with it.
     */
    g_clear_pointer(&ms->dma_pins, g_free);
}

uint64_t mem_share_dma_pages_mapped(MemShareBackend *ms)
{
    uint64_t n = 0;

    for (size_t i = 0; ms->dma_pins && i < ms->dma_npages; i++) {
        n += qatomic_read(&ms->dma_pins[i]) != 0;
    }
    return n;
}
