/*
 * The vCPU run loop in C: shared between runloop.c and the cffi declarations.
 *
 * Python owns every device. What C may do by itself is described by a small
 * table of port rules that Python keeps up to date: a device hands C the hot,
 * stateless part of its behaviour (drop a POST code, append a console byte,
 * answer a read with a constant) and C completes those exits without going
 * back to Python. Everything else returns to Python.
 */
#ifndef VMM_RUNLOOP_H
#define VMM_RUNLOOP_H

#include <stdint.h>
#include <linux/kvm.h>

#define VMM_MAX_PORT_RULES 16
#define VMM_OUTPUT_BUFFER_SIZE 4096

/* What C does with a write to a port. */
enum vmm_write_action {
    VMM_WRITE_PASS = 0,    /* return to Python */
    VMM_WRITE_DISCARD = 1, /* complete the exit, drop the data */
    VMM_WRITE_BUFFER = 2,  /* append the bytes to the output buffer */
};

/* What C does with a read from a port. */
enum vmm_read_action {
    VMM_READ_PASS = 0,     /* return to Python */
    VMM_READ_CONSTANT = 1, /* answer with rule.read_value */
};

struct vmm_port_rule {
    uint16_t port;
    uint8_t on_write;      /* enum vmm_write_action */
    uint8_t on_read;       /* enum vmm_read_action */
    uint32_t read_value;
    uint64_t hits;         /* exits this rule completed in C */
};

/* Why vmm_run_loop returned to Python. */
enum vmm_loop_result {
    VMM_LOOP_EXIT = 0,          /* an exit Python must handle is in kvm_run */
    VMM_LOOP_OUTPUT = 1,        /* a line is buffered: flush it, call again */
    VMM_LOOP_INTERRUPTED = 2,   /* KVM_RUN returned EINTR (signal, immediate_exit) */
    VMM_LOOP_ERROR = 3,         /* KVM_RUN failed: errno in stats.last_errno */
};

struct vmm_loop {
    /* configured by Python */
    int vcpu_fd;
    struct kvm_run *run;
    uint32_t nrules;
    struct vmm_port_rule rules[VMM_MAX_PORT_RULES];
    /* output produced by VMM_WRITE_BUFFER rules, drained by Python: the loop
     * returns VMM_LOOP_OUTPUT after a newline (the console is line-buffered);
     * when the buffer is full the exit goes to Python, which must drain the
     * buffer before it handles any exit so that output stays in order. */
    uint32_t output_len;
    uint8_t output[VMM_OUTPUT_BUFFER_SIZE];
    /* statistics, cumulative */
    uint64_t exits_total;        /* every return from KVM_RUN with an exit */
    uint64_t exits_in_c;         /* exits completed here without Python */
    uint64_t ns_in_kvm_run;      /* wall time inside the KVM_RUN ioctl */
    uint64_t ns_in_c_loop;       /* wall time in this loop outside KVM_RUN */
    int last_errno;
};

int vmm_run_loop(struct vmm_loop *loop);
int vmm_kvm_run_once(struct vmm_loop *loop);
uint64_t vmm_now_ns(void);

#endif
