/* Wine 8.0 (Debian 12's) lacks bcryptprimitives.dll, whose ProcessPrng Rust's standard library
 * (1.78+) calls for randomness on Windows 10 and later, where every system has it. This stand-in
 * exports ProcessPrng over BCryptGenRandom (which Wine has), for the Wine tests only: tools/test.sh
 * builds it next to kiln.exe, where Windows looks for DLLs first. Never shipped. */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
