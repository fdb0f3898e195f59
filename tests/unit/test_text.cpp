// base/text: the UTF-8 sequence check shared by printable() (messages) and the report's token
// strings (valid_utf8), against hand-worked byte sequences.
#include <gtest/gtest.h>

#include <string>

#include "base/text.hpp"

namespace test_text {
namespace {

using collapse::internal::printable;
using collapse::internal::utf8_sequence_length;

TEST(Text, Utf8SequenceLengthFollowsTheStandard) {
    struct Case {
        std::string bytes;
        size_t length;
    };
    const Case cases[] = {
        {"a", 1},          {"\x7F", 1},                 // ASCII, DEL included
        {"\xC3\xA9", 2},   {"\xE2\x82\xAC", 3},         // U+00E9, U+20AC
        {"\xF0\x9F\x98\x80", 4}, {"\xF4\x8F\xBF\xBF", 4},  // U+1F600, U+10FFFF
        {"\x80", 0},       {"\xBF", 0},                 // continuation bytes alone
        {"\xC0\xAF", 0},   {"\xC1\xBF", 0},             // overlong two-byte forms
        {"\xE0\x80\xAF", 0}, {"\xF0\x80\x80\xAF", 0},   // overlong three- and four-byte forms
        {"\xED\xA0\x80", 0},                            // U+D800, a surrogate
        {"\xF4\x90\x80\x80", 0}, {"\xF5\x80\x80\x80", 0}, {"\xFF", 0},  // past U+10FFFF
        {"\xE2\x82", 0},   {"\xE2\x28\xA1", 0},         // cut short; a non-continuation byte
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(testing::PrintToString(c.bytes));
        EXPECT_EQ(utf8_sequence_length(c.bytes, 0), c.length);
    }
    EXPECT_EQ(utf8_sequence_length("x\xC3\xA9", 1), 2u);  // from an offset
}

TEST(Text, PrintableEscapesControlAndInvalidBytesAndCuts) {
    EXPECT_EQ(printable("plain text"), "plain text");
    EXPECT_EQ(printable("a\nb\tc\x7F"), "a\\x0Ab\\x09c\\x7F");
    EXPECT_EQ(printable(std::string("n\0ul", 4)), "n\\x00ul");
    EXPECT_EQ(printable("caf\xC3\xA9 \xE9t\xE9"), "caf\xC3\xA9 \\xE9t\\xE9");  // UTF-8 kept, Latin-1 escaped
    EXPECT_EQ(printable(std::string(10, 'k'), 4), "kkkk... (10 bytes)");
}

}  // namespace
}  // namespace test_text
