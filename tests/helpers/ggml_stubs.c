/* Symbols ggml-quants.c references outside itself: enough to build it alone as a shared
   library, the oracle of tests/export/test_kquants.py. ggml_row_size is real for the types
   whose quantize_<type>(rows, importance) steps rows by it (ggml's enum ggml_type numbers). */
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(int type, int64_t ne) {
    switch (type) {
        case 10: return (size_t)(ne / 256 * 84);   /* Q2_K */
        case 11: return (size_t)(ne / 256 * 110);  /* Q3_K */
        case 12: return (size_t)(ne / 256 * 144);  /* Q4_K */
        case 13: return (size_t)(ne / 256 * 176);  /* Q5_K */
        case 14: return (size_t)(ne / 256 * 210);  /* Q6_K */
        case 20: return (size_t)(ne / 32 * 18);    /* IQ4_NL */
        default: abort();
    }
}
const char * ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; return 0; }
