/* Multiboot v1 entry: 32-bit protected mode, flat segments, interrupts off, no paging. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, give memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .bss
    .align 16
stack_bottom:
    .skip 65536
stack_top:

    .section .text
    .global _start
_start:
    cli
    mov $stack_top, %esp
    /* Keep eax (magic) and ebx (info pointer) across the bss clear. */
    mov %eax, %esi
    mov %ebx, %ebp
    /* The stack lives in .bss: clearing it is safe before anything is pushed. */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    cld
    rep stosb
    push %ebp
    push %esi
    call kmain
1:  cli
    hlt
    jmp 1b

    .section .note.GNU-stack, "", @progbits
