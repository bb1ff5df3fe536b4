/*
 * Multiboot (v1) entry of the tiny mem-share test guest.
 * The boot loader (QEMU's -kernel multiboot loader) enters in 32-bit
 * protected mode, paging off, with EAX = 0x2BADB002 and EBX = &multiboot_info.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003  /* page-align modules, want memory info */

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    xorl %ebp, %ebp
    pushl %ebx              /* multiboot info */
    pushl %eax              /* magic */
    call tiny_main
1:  hlt
    jmp 1b

    .bss
    .balign 16
stack_bottom:
    .skip 16384
stack_top:
    .section .note.GNU-stack, "", @progbits
