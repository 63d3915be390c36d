#include <gtest/gtest.h>
#include "tokenizer/tokenizer.h"
#include "test_util.h"
TEST(Tok, Smoke) {}
